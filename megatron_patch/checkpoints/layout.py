"""A save directory as Megatron-LM lays it out, and which directory a load means.

  SAVE/latest_checkpointed_iteration.txt   "100" or "release": the tracker, written last
  SAVE/iter_0000100/                       one torch_dist checkpoint (training saves)
  SAVE/release/                            converter output: weights only

A load may name the save directory (the tracker picks the iteration, or ``iteration`` overrides
it) or an iteration directory itself. Training (``--load``) also starts from an HF model directory
(``is_hf_model_dir``), read straight from its safetensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.errors import InputError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
# dist_checkpointing writes it last: a directory without it is not a complete checkpoint.
COMPLETE_MARKER = "metadata.json"


class CheckpointError(InputError):
    """A checkpoint that cannot be found, read or loaded; the message names the file or directory."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path  # the torch_dist directory itself
    release: bool  # converter output (weights only) rather than a training save


def iteration_dir(save_dir: str | Path, iteration: int | str) -> Path:
    """SAVE/iter_XXXXXXX for a number, SAVE/release for "release"."""
    if iteration == RELEASE:
        return Path(save_dir) / RELEASE
    return Path(save_dir) / f"iter_{int(iteration):07d}"


def _parse_iteration(text: str, source: str) -> int | str:
    text = text.strip()
    if text == RELEASE:
        return RELEASE
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise CheckpointError(f"{source}: expected an iteration number or 'release', got {text!r}")
    return value


def resolve_checkpoint(load_dir: str | Path, iteration: str | int | None = None) -> ResolvedCheckpoint:
    """The complete torch_dist directory that ``load_dir`` (and ``iteration``, if given) means."""
    load_dir = Path(load_dir)
    if iteration is None and (load_dir / COMPLETE_MARKER).is_file():
        return ResolvedCheckpoint(load_dir, load_dir.name == RELEASE)
    if not load_dir.exists():
        raise CheckpointError(f"{load_dir}: no such directory")
    if iteration is None:
        tracker = load_dir / TRACKER_FILE
        if not tracker.is_file():
            raise CheckpointError(f"{load_dir}: no {TRACKER_FILE} and no {COMPLETE_MARKER} "
                                  "(not a torch_dist checkpoint or a save directory)")
        number = _parse_iteration(tracker.read_text(), str(tracker))
    else:
        number = _parse_iteration(str(iteration), "--iteration")
    path = iteration_dir(load_dir, number)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete torch_dist checkpoint ({COMPLETE_MARKER} missing)")
    return ResolvedCheckpoint(path, number == RELEASE)


def is_hf_model_dir(path: str | Path) -> bool:
    """An HF model directory (config.json, safetensors weights) rather than a torch_dist checkpoint or a save.

    A save directory also holds config.json (beside its tracker), so the torch_dist markers decide;
    an HF directory whose weights are missing still counts, so that the load says which are missing.
    """
    path = Path(path)
    return (path / "config.json").is_file() and not (path / TRACKER_FILE).exists() \
        and not (path / COMPLETE_MARKER).exists()


def tracked_iteration(save_dir: str | Path) -> int | str | None:
    """The iteration the tracker of ``save_dir`` names (None without a tracker)."""
    tracker = Path(save_dir) / TRACKER_FILE
    return _parse_iteration(tracker.read_text(), str(tracker)) if tracker.is_file() else None


def write_tracker(save_dir: str | Path, iteration: int | str) -> None:
    """Point the tracker at ``iteration``, atomically (a reader sees the old or the new value).

    Never backwards: a save of an older iteration than the tracker names would make the newer
    checkpoints unreachable (and a later resume repeat steps).
    """
    save_dir = Path(save_dir)
    current = tracked_iteration(save_dir)
    if isinstance(current, int) and isinstance(iteration, int) and iteration < current:
        raise CheckpointError(f"{save_dir / TRACKER_FILE}: names iteration {current}; a save of iteration "
                              f"{iteration} would move it back")
    temporary = save_dir / f".{TRACKER_FILE}.tmp"
    temporary.write_text(str(iteration))
    os.replace(temporary, save_dir / TRACKER_FILE)
