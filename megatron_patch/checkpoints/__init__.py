"""Checkpoints on disk, for every job that reads or writes them (convert, training, LoRA, evaluation).

- ``layout``: a save directory's tracker file and iteration directories, and the one resolver of
  "which directory do I load".
- ``staging``: outputs built under a temporary name and renamed into place when complete, and the
  HF side files (config, tokenizer) that travel beside weights.
- ``reader``: any region of any tensor of a torch_dist checkpoint, without process groups.
- ``manifest``: ``checksums.json``, written into every staged output and verified before a load.
- ``metadata``: what our saves record about themselves.
- ``weights``: model weights into live model chunks (weights only, optionally a subset of keys),
  from a torch_dist checkpoint or straight from an HF model directory.

Training's resume state (optimizer, schedule, RNG, data position) stays in ``training``.
"""

from megatron_patch.checkpoints.layout import (
    TRACKER_FILE,
    CheckpointError,
    ResolvedCheckpoint,
    is_hf_model_dir,
    iteration_dir,
    resolve_checkpoint,
    tracked_iteration,
    write_tracker,
)
from megatron_patch.checkpoints.manifest import MANIFEST_FILE, ChecksumError, verify_manifest
from megatron_patch.checkpoints.metadata import CHECKPOINT_VERSION, checkpoint_info
from megatron_patch.checkpoints.reader import TorchDistCheckpoint
from megatron_patch.checkpoints.staging import StagedOutput, copy_side_files
from megatron_patch.checkpoints.weights import check_hf_model, load_hf_model, load_weights

__all__ = [
    "CHECKPOINT_VERSION",
    "TRACKER_FILE",
    "CheckpointError",
    "ChecksumError",
    "MANIFEST_FILE",
    "ResolvedCheckpoint",
    "StagedOutput",
    "TorchDistCheckpoint",
    "check_hf_model",
    "checkpoint_info",
    "copy_side_files",
    "is_hf_model_dir",
    "iteration_dir",
    "load_hf_model",
    "load_weights",
    "verify_manifest",
    "resolve_checkpoint",
    "tracked_iteration",
    "write_tracker",
]
