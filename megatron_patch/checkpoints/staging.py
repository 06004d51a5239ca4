"""Output directories that appear only when complete, and the files that travel beside the weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_patch.checkpoints.layout import CheckpointError
from megatron_patch.checkpoints.manifest import MANIFEST_FILE, checksums_enabled, write_manifest
from megatron_patch.outputs import DestinationLock, disk_full, no_space, overlaps

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
                 sources: tuple = (), only_own: bool = False, made_from: str | None = None):
        """``only_own``: with ``force``, replace only a directory the kit wrote (its ``checksums.json``), never
        one of other files (an output the user did not name as disposable: --save-hf, --save-peft).
        ``made_from``: recorded in the manifest (``made_from``): the save an HF output was written from."""
        self.final = Path(final).absolute()
        self.staging = self.final.with_name(f".{self.final.name}.incomplete.{os.getpid()}")
        self.force, self.only_own, self.made_from = force, only_own, made_from
        self.label = label  # how the user named the destination (SAVE_DIR, --peft-out, ...)
        self.sources = tuple(Path(s) for s in sources if s is not None)
        self._lock = DestinationLock(self.final.with_name(f".{self.final.name}.lock"), self.final, label)

    def _check(self) -> None:
        for source in self.sources:
            if source.exists() and overlaps(self.final, source):
                raise CheckpointError(f"{self.label} {self.final} is, contains or lies inside the input {source}; "
                                      "writing there would destroy what is being read (even with --force)")
        check_replaceable(self.final, self.label, self.force, self.only_own)

    def _acquire(self) -> None:
        self._lock.acquire()
        for stale in self.final.parent.glob(f".{self.final.name}.incomplete*"):
            shutil.rmtree(stale, ignore_errors=True)  # only a killed writer leaves these: we hold the lock

    def __enter__(self) -> Path:
        failure = None
        if _is_rank0():
            try:
                self._check()
                self._acquire()
                self.staging.mkdir(parents=True)
            except BaseException as err:  # told to every rank below, so none waits forever
                self._lock.release()
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
            full = disk_full(failure, self.staging.parent) if failure is not None else None
            if failure is not None and _is_rank0():  # nothing is left behind, disk full included
                shutil.rmtree(self.staging, ignore_errors=True)
            self._lock.release()
            if full:
                raise no_space(self.final, full) from None
        return False

    def _commit(self) -> None:
        _barrier()
        if checksums_enabled():
            write_manifest(self.staging, made_from=self.made_from)
        if _is_rank0():
            replaced = None
            if self.final.exists():
                replaced = self.final.with_name(f".{self.final.name}.replaced.{os.getpid()}")
                self.final.rename(replaced)
            self.staging.rename(self.final)
            if replaced is not None:
                shutil.rmtree(replaced)
        _barrier()


def check_replaceable(final: Path, label: str, force: bool = False, only_own: bool = False) -> None:
    """Raise CheckpointError unless an output may be written at ``final``: nothing there, an empty directory,
    or with ``force`` a directory (with ``only_own``, one the kit wrote). A file or a link is never replaced:
    the kit did not make it."""
    if final.is_symlink():
        raise CheckpointError(f"{label} {final} is a symbolic link; give the directory itself")
    if not final.exists():
        return
    if not final.is_dir():
        raise CheckpointError(f"{label} {final} is a file, not a directory; the kit never replaces a file it did "
                              f"not write: choose another {label}")
    if not any(final.iterdir()):
        return
    if not force:
        raise CheckpointError(f"{final} is not empty; choose another {label} or pass --force to replace it")
    if only_own and not (final / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{label} {final} holds files the kit did not write (no {MANIFEST_FILE}); choose "
                              "another directory or empty it")


def copy_side_files(source: str | Path, destination: str | Path, dtype_name: str | None = None,
                    overwrite: bool = True) -> list[str]:
    """Copy config/tokenizer files; with ``dtype_name``, config.json records the weights' new dtype.
    ``overwrite=False`` keeps the files ``destination`` already has."""
    source, destination = Path(source), Path(destination)
    copied = []
    for pattern in SIDE_FILE_PATTERNS:
        for path in sorted(source.glob(pattern)):
            if path.is_file() and (overwrite or not (destination / path.name).exists()):
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
