"""The one base class of the kit's bad-input errors.

Every error a user can fix by changing an argument, a file or a setting derives from
``InputError``; its message is one line that names the argument, file, line or tensor.
Entry points print it as ``error: ...`` and exit with status 2 (``exit_on_input_error``);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input: one line for the user, exit status 2."""


INPUT_ERROR_STATUS = 2


def exit_on_input_error(job: Callable[[], object], prefix: str = "") -> int:
    """Run ``job``; an InputError becomes one line on stderr and status 2, success status 0."""
    try:
        job()
    except InputError as err:
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        return INPUT_ERROR_STATUS
    return 0
