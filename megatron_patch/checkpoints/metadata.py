"""What a checkpoint says about itself: Megatron-LM's common entries and our own ``megatron_patch`` record."""

from __future__ import annotations

from pathlib import Path

from megatron_patch.checkpoints.layout import COMPLETE_MARKER, CheckpointError, resolve_checkpoint
from megatron_patch.checkpoints.manifest import verify_manifest
from megatron_patch.patches.compat import common_state_files

CHECKPOINT_VERSION = 3.0
# The common-state key of our record: has_optimizer, world_size, model, lora, ... (empty for converter output).
RECORD_KEY = "megatron_patch"


def common_state(path: str | Path) -> dict:
    """The non-tensor entries of a torch_dist checkpoint directory (iteration, our record, ...)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete torch_dist checkpoint ({COMPLETE_MARKER} missing)")
    # This process alone, just the files the common state is read from; the tensors are checked where they are read.
    verify_manifest(path, only=(*common_state_files(path), COMPLETE_MARKER))
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as err:  # a damaged or foreign common.pt: name the directory and the cause
        raise CheckpointError(f"{path}: cannot read its common state ({type(err).__name__}: {err})") from err
    return common if isinstance(common, dict) else {}


def checkpoint_info(load_dir: str | Path) -> dict:
    """Our record of a save directory or checkpoint (empty for converter output)."""
    return common_state(resolve_checkpoint(load_dir).path).get(RECORD_KEY, {})
