"""The user's own Python files (rewards, tools), imported as given: ``PATH.py:NAME[,NAME...]``.

Only ever imported inside their own process (``rl/child_process.py``); a file that is missing or fails
to import is named in one line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from megatron_patch.errors import InputError


def user_functions(spec: str, label: str, error: type[InputError] = InputError,
                   form: str = "PATH.py:FUNCTION") -> dict[str, Callable]:
    """The functions ``PATH.py:NAME[,NAME...]`` names, by name; ``label`` starts each error line
    ("reward custom:r.py:f", "--tools t.py:f"), ``form`` is what a malformed spec is told to look like."""
    path_text, _, names = spec.rpartition(":")
    path = Path(path_text)
    if not path_text or not names:
        raise error(f"{label}: expected {form}")
    if not path.is_file():
        raise error(f"{label}: {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"megatron_patch_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise error(f"{label}: {path}:{err.lineno}: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 - an import-time failure of the user's file, named
        raise error(f"{label}: importing {path} failed: {type(err).__name__}: {err}") from None
    functions = {}
    for name in (part.strip() for part in names.split(",")):
        function = getattr(module, name, None)
        if not callable(function):
            raise error(f"{label}: {path} has no function {name}")
        functions[name] = function
    return functions
