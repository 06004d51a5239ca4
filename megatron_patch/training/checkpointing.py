"""Training checkpoints in Megatron-Core's torch_dist format, laid out as Megatron-LM lays them out.

  SAVE/iter_0000100/           one checkpoint (dist_checkpointing: model, optimizer, schedule, RNG)
  SAVE/latest_checkpointed_iteration.txt   "100", written (atomically) only after the save is complete
  SAVE/config.json, tokenizer files        copied once, so the directory is an HF-convertible model

Each iteration directory is written under a temporary name and renamed when complete, so a
killed run never leaves a directory that looks like a checkpoint. ``load`` accepts converter
output (tracker "release": weights only, training starts at iteration 0) and our own saves
(weights, optimizer, LR schedule, RNG and data position: the run continues where it stopped).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_patch.convert.output import TRACKER_FILE, StagedOutput, copy_side_files

CHECKPOINT_VERSION = 3.0


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the directory."""


@dataclass
class LoadedState:
    iteration: int = 0
    consumed_samples: int = 0
    resumed: bool = False  # optimizer/schedule/RNG restored (not just weights)
    source: str = ""


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def _model_keys(chunks) -> list[str]:
    """Megatron-LM's names: "model", or "model0", "model1", ... with virtual pipeline chunks."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _model_state(chunks) -> dict:
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(chunks), chunks)}


def _selected(states: dict, keep=None) -> dict:
    """The entries of ``_model_state`` whose checkpoint key ``keep`` accepts (all without ``keep``)."""
    if keep is None:
        return dict(states)
    return {key: {name: value for name, value in state.items() if keep(value.key)} for key, state in states.items()}


def _load_into(chunks, loaded: dict, requested: dict, partial: bool) -> None:
    """load_state_dict each chunk; with a filtered request, only the requested entries may be missing."""
    for key, chunk in zip(_model_keys(chunks), chunks):
        if not partial:
            chunk.load_state_dict(loaded[key], strict=True)
            continue
        result = chunk.load_state_dict(loaded[key], strict=False)
        full = set(chunk.state_dict().keys())
        unexpected_missing = set(result.missing_keys) - (full - set(requested[key]))
        if unexpected_missing or result.unexpected_keys:
            raise CheckpointError(f"state mismatch: missing {sorted(unexpected_missing)[:3]}, "
                                  f"unexpected {sorted(result.unexpected_keys)[:3]}")


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object():
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # One entry per rank: expert/tensor-parallel RNG streams differ between ranks.
    return ShardedObject("rng_state", _rng_state(), (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _optimizer_state(optimizer, model_state: dict, is_loading: bool) -> dict:
    return optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
    )


def save_checkpoint(save_dir, iteration: int, chunks, optimizer, scheduler, consumed_samples: int,
                    save_optim: bool = True, side_files_from: str | Path | None = None, hf_config: dict | None = None,
                    extra: dict | None = None, keep=None) -> Path:
    """Write SAVE/iter_XXXXXXX (staged, then renamed) and only then point the tracker at it.

    ``keep(checkpoint_key)`` saves only part of the model (LoRA: the adapters); the optimizer state
    is the optimizer's, whose parameters are then exactly those.
    """
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, iteration)
    model_state = _model_state(chunks)
    state = _selected(model_state, keep)
    if save_optim:
        state["optimizer"] = _optimizer_state(optimizer, model_state, is_loading=False)
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_sharded_object()
    state.update(
        iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, consumed_train_samples=consumed_samples,
        megatron_patch={"has_optimizer": save_optim, "world_size": dist.get_world_size(), **(extra or {})},
    )
    with StagedOutput(final, force=True) as staging:
        dist_checkpointing.save(sharded_state_dict=state, checkpoint_dir=str(staging))
    if dist.get_rank() == 0:
        _write_side_files(save_dir, side_files_from, hf_config)
        temporary = save_dir / f".{TRACKER_FILE}.tmp"
        temporary.write_text(str(iteration))
        os.replace(temporary, save_dir / TRACKER_FILE)
    dist.barrier()
    return final


def _write_side_files(save_dir: Path, source: str | Path | None, hf_config: dict | None) -> None:
    """Tokenizer and config beside the checkpoints (once), so the save directory converts to HF as is."""
    import json

    if source is not None and Path(source).resolve() != save_dir.resolve() and not (save_dir / "tokenizer.json").exists():
        copy_side_files(source, save_dir)
    if hf_config is not None and not (save_dir / "config.json").exists():
        (save_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def resolve_load_dir(load_dir: str | Path) -> tuple[Path, bool]:
    """(checkpoint directory, is_release) for a save directory with a tracker, or a checkpoint itself."""
    load_dir = Path(load_dir)
    tracker = load_dir / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            return load_dir / "release", True
        try:
            return iteration_dir(load_dir, int(text)), False
        except ValueError:
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {text!r}") from None
    if (load_dir / "metadata.json").is_file():
        return load_dir, load_dir.name == "release"
    raise CheckpointError(f"--load {load_dir}: no {TRACKER_FILE} and not a torch_dist checkpoint directory")


def load_weights(load_dir, chunks) -> Path:
    """The model weights of a save directory or checkpoint (ours or converter output) into ``chunks``."""
    from megatron.core import dist_checkpointing

    path, _ = resolve_load_dir(load_dir)
    lora = checkpoint_info(path).get("lora")
    if lora is not None:
        # The model here has no adapters: loading would silently give the base model's behaviour.
        raise CheckpointError(f"{path}: a LoRA checkpoint (rank {lora['rank']} on {' '.join(lora['targets'])}); "
                              "merge its adapters into the base model first")
    try:
        loaded = dist_checkpointing.load(sharded_state_dict=_model_state(chunks), checkpoint_dir=str(path))
    except Exception as err:  # dist_checkpointing raises several types; the user needs the path and the cause
        raise CheckpointError(f"{path}: cannot load into this model ({type(err).__name__}: {err})") from err
    for key, chunk in zip(_model_keys(chunks), chunks):
        chunk.load_state_dict(loaded[key], strict=True)
    return path


def checkpoint_info(load_dir) -> dict:
    """What our saves record about themselves (empty for converter output)."""
    from megatron.core import dist_checkpointing

    path, _ = resolve_load_dir(load_dir)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path}: not a complete torch_dist checkpoint (no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(path))
    return common.get("megatron_patch", {}) if isinstance(common, dict) else {}


def load_checkpoint(load_dir, chunks, optimizer, scheduler, load_optim: bool = True, keep=None) -> LoadedState:
    """Load weights (always) and, from our own saves, optimizer, schedule, RNG and data position.

    ``keep(checkpoint_key)`` loads only part of the model (the rest keeps its values).
    """
    from megatron.core import dist_checkpointing

    path, release = resolve_load_dir(load_dir)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path}: not a complete torch_dist checkpoint (no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(path))
    info = common.get("megatron_patch", {}) if isinstance(common, dict) else {}
    resume = not release and load_optim and info.get("has_optimizer", False)
    model_state = _model_state(chunks)
    state = _selected(model_state, keep)
    if resume:
        state["optimizer"] = _optimizer_state(optimizer, model_state, is_loading=True)
        same_world = info.get("world_size") == dist.get_world_size()
        if same_world:
            state["rng_state"] = _rng_sharded_object()
    try:
        loaded = dist_checkpointing.load(sharded_state_dict=state, checkpoint_dir=str(path))
    except Exception as err:  # dist_checkpointing raises several types; the user needs the path and the cause
        raise CheckpointError(f"{path}: cannot load into this model ({type(err).__name__}: {err})") from err
    _load_into(chunks, loaded, state, partial=keep is not None)
    if not resume:
        if optimizer is not None:  # its main (fp32) copies were made from the initial weights
            optimizer.reload_model_params()
        return LoadedState(source=str(path))
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return LoadedState(
        iteration=int(common["iteration"]), consumed_samples=int(common.get("consumed_train_samples", 0)),
        resumed=True, source=str(path),
    )
