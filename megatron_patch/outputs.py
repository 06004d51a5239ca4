"""What every writer of outputs shares: one writer per destination, inputs never overwritten, a full
disk said in one line.

``checkpoints.StagedOutput`` (directories: converter output, saves, exports) and
``data.indexed`` (dataset files) build on these.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from megatron_patch.errors import InputError


class OutputError(InputError):
    """An output that cannot be written where asked; the message names it."""


class DestinationLock:
    """An exclusive, non-blocking POSIX lock (``lockf``) on ``lock_path`` for the whole write of one
    destination.

    A second writer stops with one line instead of clobbering the first; the kernel drops the
    lock when its holder dies. A POSIX lock belongs to the process: children it forks (Megatron-
    Core's checkpoint writers are forked) do not hold it, so a killed job's orphans cannot block
    the rerun (a ``flock`` would be theirs too). The holder removes the lock file before it lets
    go, so nothing is left behind; a writer that locked a file just removed sees its inode gone
    and tries again.
    """

    def __init__(self, lock_path: Path, destination: Path, label: str):
        self.lock_path, self.destination, self.label = lock_path, destination, label
        self._handle = None

    def acquire(self) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            handle = open(self.lock_path, "a+")
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, as the system reports it
                handle.close()
                raise OutputError(f"{self.destination} is being written by another process (lock "
                                  f"{self.lock_path}); wait for it or choose another {self.label}") from None
            try:
                current = os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                self._handle = handle
                return
            handle.close()  # locked a file its holder had just removed: lock the new one
        raise OutputError(f"{self.lock_path}: could not take the lock")

    def release(self) -> None:
        if self._handle is not None:
            self.lock_path.unlink(missing_ok=True)  # while still holding it (see acquire)
            fcntl.lockf(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DestinationLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def check_writable(path: str | Path, label: str) -> None:
    """An output can be created at ``path``: its nearest existing ancestor is a directory this process may
    write in (tried, with a directory made and removed: permission bits say nothing to root, and a
    read-only mount shows only when written). Checked before a job starts, not found after training."""
    path = Path(path).absolute()
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{label} {path}: {ancestor} is a file, so nothing can be written under it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mp-write-check-", dir=ancestor))
    except OSError as err:
        raise OutputError(f"{label} {path}: cannot write in {ancestor} ({err.strerror})") from None


def within(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or lies inside it (links followed)."""
    path, other = Path(path).resolve(), Path(other).resolve()
    return path == other or other in path.parents


def overlaps(path: Path, other: Path) -> bool:
    """The same path, or one inside the other."""
    return within(path, other) or within(other, path)


# How a full disk shows through torch.save and DCP, which often lose the OSError on the way.
_WRITE_FAILED = ("no space left", "unexpected pos", "file write failed", "enospc")


def free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 1 << 62


def disk_full(failure: BaseException, directory: Path) -> str | None:
    """"N MiB free" when ``failure`` was (most likely) a full disk under ``directory``, else None.

    Call it before removing the partial output, which frees the space.
    """
    chain, cause = [], failure
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    free = free_bytes(directory)
    said = f"{free / 2**20:.1f} MiB free"
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return said
    text = " ".join(str(e) for e in chain).lower()
    if any(sign in text for sign in _WRITE_FAILED) and free < 64 << 20:
        return said
    return None


def no_space(destination: Path, full: str) -> OutputError:
    return OutputError(f"no space left on the device writing {destination} ({full}); the partial output was removed")
