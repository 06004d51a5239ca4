"""Output directories that appear only when complete, and the files that travel beside the weights."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_patch.checkpoints.layout import CheckpointError
from megatron_patch.checkpoints.manifest import checksums_enabled, write_manifest

# Copied beside converted weights (Pai copies *.json and merges.txt): config, tokenizer, chat template.
SIDE_FILE_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "*.tiktoken", "*.model",
)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# How a full disk shows through torch.save and DCP, which often lose the OSError on the way.
_WRITE_FAILED = ("no space left", "unexpected pos", "file write failed", "enospc")


def _disk_full(failure: BaseException, directory: Path) -> str | None:
    """How full the disk under ``directory`` is, when ``failure`` was (probably) a full disk."""
    chain, cause = [], failure
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return f"{_free(directory)} free"
    text = " ".join(str(e) for e in chain).lower()
    if any(sign in text for sign in _WRITE_FAILED) and _free_bytes(directory) < 64 << 20:
        return f"{_free(directory)} free"
    return None


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 1 << 62


def _free(directory: Path) -> str:
    return f"{_free_bytes(directory) / 2**20:.1f} MiB"


def _overlaps(path: Path, other: Path) -> bool:
    """The same directory, or one inside the other."""
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents or path in other.parents


class StagedOutput:
    """Build a directory under ``.<name>.incomplete.<pid>`` and rename it into place only on success.

    A run that fails or is killed never leaves anything at the final path. A lock file beside
    the destination (``.<name>.lock``, held for the whole write) makes a second writer stop with
    one line instead of clobbering the first; the lock holder removes stale staging directories
    of killed runs. An existing non-empty final directory is replaced only with ``force``, and
    never when it is (or contains, or lies inside) one of the ``sources`` being read. Every rank
    of the default group (if any) enters and leaves together; rank 0 does the file work. Last,
    ``checksums.json`` records every file (``manifest``), so a later load can tell a changed byte.
    """

    def __init__(self, final: str | Path, force: bool = False, label: str = "output directory",
                 sources: tuple = (), checksums: bool = True):
        self.final = Path(final).absolute()
        self.staging = self.final.with_name(f".{self.final.name}.incomplete.{os.getpid()}")
        self.lock_path = self.final.with_name(f".{self.final.name}.lock")
        self.force = force
        self.label = label  # how the user named the destination (SAVE_DIR, --peft-out, ...)
        self.sources = tuple(Path(s) for s in sources if s is not None)
        self.checksums = checksums
        self._lock = None

    def _check(self) -> None:
        for source in self.sources:
            if source.exists() and _overlaps(self.final, source):
                raise CheckpointError(f"{self.label} {self.final} is, contains or lies inside the input {source}; "
                                      "writing there would destroy what is being read (even with --force)")
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())) and not self.force:
            raise CheckpointError(f"{self.final} is not empty; choose another {self.label} or pass --force "
                                  "to replace it")

    def _acquire(self) -> None:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise CheckpointError(f"{self.final} is being written by another process (lock {self.lock_path}); "
                                  "wait for it or choose another " + self.label) from None
        self._lock = handle
        for stale in self.final.parent.glob(f".{self.final.name}.incomplete*"):
            shutil.rmtree(stale, ignore_errors=True)  # only a killed writer leaves these: we hold the lock

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Path:
        failure = None
        if _is_rank0():
            try:
                self._check()
                self._acquire()
                self.staging.mkdir(parents=True)
            except BaseException as err:  # told to every rank below, so none waits forever
                self._release()
                failure = err
        if dist.is_initialized():
            shared = [None if failure is None else str(failure), str(self.staging)]
            dist.broadcast_object_list(shared, src=0)
            if failure is None and shared[0] is not None:
                raise CheckpointError(shared[0])
            self.staging = Path(shared[1])
        if failure is not None:
            raise failure
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> bool:
        failure = exc
        try:
            if exc_type is None:
                self._commit()
        except BaseException as err:
            failure = err
            raise
        finally:
            self._release()
            full = _disk_full(failure, self.staging.parent) if failure is not None else None
            if failure is not None and _is_rank0():  # nothing is left behind, disk full included
                shutil.rmtree(self.staging, ignore_errors=True)
            if full:
                raise CheckpointError(f"no space left on the device writing {self.final} ({full}); "
                                      "the partial output was removed") from None
        return False

    def _commit(self) -> None:
        _barrier()
        if self.checksums and checksums_enabled():
            write_manifest(self.staging)
        if _is_rank0():
            replaced = None
            if self.final.exists():
                replaced = self.final.with_name(f".{self.final.name}.replaced.{os.getpid()}")
                self.final.rename(replaced)
            self.staging.rename(self.final)
            if replaced is not None:
                shutil.rmtree(replaced)
        _barrier()


def copy_side_files(source: str | Path, destination: str | Path, dtype_name: str | None = None) -> list[str]:
    """Copy config/tokenizer files; with ``dtype_name``, config.json records the weights' new dtype."""
    source, destination = Path(source), Path(destination)
    copied = []
    for pattern in SIDE_FILE_PATTERNS:
        for path in sorted(source.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, destination / path.name)
                copied.append(path.name)
    config_path = destination / "config.json"
    if dtype_name and config_path.is_file():
        config = json.loads(config_path.read_text())
        # transformers 4.x writes torch_dtype, 5.x dtype; keep whichever the file uses.
        key = "dtype" if "dtype" in config else "torch_dtype"
        config[key] = dtype_name
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return copied
