"""Model weights of a torch_dist checkpoint (or an HF model directory) into live Megatron-Core model
chunks, at any layout.

Keys follow Megatron-LM: "model", or "model0", "model1", ... with virtual pipeline chunks.
``keep(checkpoint_key)`` selects a subset of the model's tensors (LoRA: the adapters, or
everything but them); the rest of the model keeps its values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from megatron_patch.checkpoints.layout import CheckpointError, resolve_checkpoint
from megatron_patch.checkpoints.manifest import MANIFEST_FILE, verify_manifest
from megatron_patch.checkpoints.metadata import RECORD_KEY, common_state
from megatron_patch.errors import InputError
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.loading import hf_weight_source, load_hf_weights
from megatron_patch.patches.safe_checkpoints import REFUSED_PATTERN, UnsafeCheckpointError

KeyFilter = Callable[[str], bool]
_REFUSED = re.compile(REFUSED_PATTERN)


def model_keys(chunks) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def model_sharded_state(chunks) -> dict:
    return {key: chunk.sharded_state_dict() for key, chunk in zip(model_keys(chunks), chunks)}


def select(states: dict, keep: KeyFilter | None = None) -> dict:
    """The entries of ``model_sharded_state`` whose checkpoint key ``keep`` accepts (all without ``keep``)."""
    if keep is None:
        return dict(states)
    return {key: {name: value for name, value in state.items() if keep(value.key)} for key, state in states.items()}


def load_sharded(path: Path, state: dict) -> dict:
    """dist_checkpointing.load, after checking ``path``'s checksums, with every failure turned into one
    CheckpointError naming ``path``.

    A pickle refused by patches/safe_checkpoints.py (in ``.metadata`` or an item) reaches here
    inside torch DCP's collective error report; its one line is taken out of it.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    verify_manifest(path)
    try:
        return dist_checkpointing.load(sharded_state_dict=state, checkpoint_dir=str(path))
    except InputError:
        raise
    except (Exception, CheckpointException) as err:
        refused = _REFUSED.search(str(err))
        if refused:
            raise UnsafeCheckpointError(refused.group(0)) from None
        # dist_checkpointing raises several types; the user needs the path and the cause.
        raise CheckpointError(f"{path}: cannot load into this model ({type(err).__name__}: {err})") from err


def load_into(chunks, loaded: dict, requested: dict, partial: bool) -> None:
    """load_state_dict each chunk; with a filtered request, only the unrequested entries may be missing."""
    for key, chunk in zip(model_keys(chunks), chunks):
        if not partial:
            chunk.load_state_dict(loaded[key], strict=True)
            continue
        result = chunk.load_state_dict(loaded[key], strict=False)
        full = set(chunk.state_dict().keys())
        unexpected_missing = set(result.missing_keys) - (full - set(requested[key]))
        if unexpected_missing or result.unexpected_keys:
            raise CheckpointError(f"state mismatch: missing {sorted(unexpected_missing)[:3]}, "
                                  f"unexpected {sorted(result.unexpected_keys)[:3]}")


def load_weights(load_dir: str | Path, chunks, keep: KeyFilter | None = None) -> Path:
    """The model weights of a save directory or checkpoint (ours or converter output) into ``chunks``.

    Without ``keep``, a LoRA checkpoint is refused: the model here has no adapters, and loading
    would silently give the base model's behaviour.
    """
    path = resolve_checkpoint(load_dir).path
    lora = common_state(path).get(RECORD_KEY, {}).get("lora")
    if lora is not None and keep is None:
        raise CheckpointError(f"{path}: a LoRA checkpoint (rank {lora['rank']} on {' '.join(lora['targets'])}); "
                              "merge its adapters into the base model first")
    requested = select(model_sharded_state(chunks), keep)
    load_into(chunks, load_sharded(path, requested), requested, partial=keep is not None)
    return path


def _check_hf_config(path: Path, arch: Qwen3Arch) -> None:
    theirs = Qwen3Arch.from_hf_dir(path)  # another architecture is named here, with the file
    differences = arch.shape_differences(theirs)
    if differences:
        raise CheckpointError(f"{path / 'config.json'}: not the model being trained ({differences[0]}; "
                              "the run's value first)")


def check_hf_model(path: str | Path, arch: Qwen3Arch) -> None:
    """An HF model directory holds ``arch``: its config.json, every shard the index names and every
    tensor name (headers only; shapes are checked by each rank as it loads)."""
    _check_hf_config(Path(path), arch)
    hf_weight_source(path, arch)


def load_hf_model(path: str | Path, chunks, arch: Qwen3Arch, keep: KeyFilter | None = None) -> Path:
    """The weights of an HF model directory straight into ``chunks`` (no torch_dist copy is written);
    each rank reads the tensors behind its own shards. Our own HF outputs are checked against their
    checksums first."""
    path = Path(path)
    _check_hf_config(path, arch)
    if (path / MANIFEST_FILE).is_file():
        verify_manifest(path)
    load_hf_weights(chunks, path, arch, keep=keep)  # names and shapes checked before a tensor is read
    return path
