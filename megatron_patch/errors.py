"""The one base class of the kit's bad-input errors.

Every error a user can fix by changing an argument, a file or a setting derives from
``InputError``; its message is one line that names the argument, file, line or tensor.
Entry points print it as ``error: ...`` and exit with status 2 (``exit_on_input_error``);
anything else is a bug and keeps its traceback.

Under torchrun every worker meets the same bad input: rank 0 prints the line, and each worker
records it in torchrun's error file, where ``python -m megatron_patch.torchrun`` finds it and
says it once instead of torchrun's ChildFailedError report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable


class InputError(ValueError):
    """Bad input: one line for the user, exit status 2."""


INPUT_ERROR_STATUS = 2


# Our mark in a torchrun error file: the line is an InputError's, and whether this rank printed it.
TORCHRUN_MARK = "megatron_patch_input_error"


def report_input_error(err: InputError) -> int:
    """Say ``err`` as one line (rank 0 of a torchrun job, or a process on its own); returns status 2."""
    printed = os.environ.get("RANK", "0") == "0"
    if printed:
        print(f"error: {err}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun's documented error-file format
        record = {"message": {"message": str(err), "extraInfo": {"timestamp": str(int(time.time())),
                                                                 TORCHRUN_MARK: {"printed": printed}}}}
        try:
            with open(error_file, "w") as handle:
                json.dump(record, handle)
        except OSError:
            pass
    return INPUT_ERROR_STATUS


def exit_on_input_error(job: Callable[[], object]) -> int:
    """Run ``job``; an InputError becomes one line on stderr and status 2, success status 0."""
    try:
        job()
    except InputError as err:
        return report_input_error(err)
    return 0
