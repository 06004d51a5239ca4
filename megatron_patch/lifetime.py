"""Processes the kit starts end with the one that started them, however it ends (even ``kill -9``).

Its own module, without torch, so that a light child (a reward worker) can ask for it cheaply.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent() -> None:
    """Have Linux kill this process (SIGKILL) when its parent ends, however the parent ends; also a
    ``preexec_fn`` for a child the kit starts (a rollout engine, a reward worker)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)
