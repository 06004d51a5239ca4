"""Training saves and resume: the model plus optimizer, LR schedule, RNG and data position.

  SAVE/iter_0000100/           one checkpoint (dist_checkpointing: model, optimizer, schedule, RNG)
  SAVE/latest_checkpointed_iteration.txt   "100", written (atomically) only after the save is complete
  SAVE/config.json, tokenizer files        copied once, so the directory is an HF-convertible model

Where checkpoints live and how model weights load is ``megatron_patch.checkpoints``; this module
adds what only a training run has. Each iteration directory is written under a temporary name
and renamed when complete, so a killed run never leaves a directory that looks like a
checkpoint. ``load_checkpoint`` accepts converter output and HF model directories (weights only:
training starts at iteration 0) and our own saves (the run continues where it stopped).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_patch.checkpoints import (
    CHECKPOINT_VERSION,
    StagedOutput,
    copy_side_files,
    is_hf_model_dir,
    iteration_dir,
    load_hf_model,
    resolve_checkpoint,
    write_tracker,
)
from megatron_patch.checkpoints.metadata import RECORD_KEY, common_state
from megatron_patch.checkpoints.weights import KeyFilter, load_into, load_sharded, model_sharded_state, select
from megatron_patch.models.qwen3.arch import Qwen3Arch


@dataclass
class LoadedState:
    iteration: int = 0
    consumed_samples: int = 0
    resumed: bool = False  # optimizer/schedule/RNG restored (not just weights)
    source: str = ""
    hf: bool = False  # read straight from an HF model directory


def _rng_state() -> dict:
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
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object():
    # One entry per rank: expert/tensor-parallel RNG streams differ between ranks.
    return ShardedObject("rng_state", _rng_state(), (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _optimizer_state(optimizer, model_state: dict, is_loading: bool) -> dict:
    return optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
    )


def save_checkpoint(save_dir, iteration: int, chunks, optimizer, scheduler, consumed_samples: int,
                    save_optim: bool = True, side_files_from: str | Path | None = None, hf_config: dict | None = None,
                    extra: dict | None = None, keep: KeyFilter | None = None) -> Path:
    """Write SAVE/iter_XXXXXXX (staged, then renamed) and only then point the tracker at it.

    ``keep(checkpoint_key)`` saves only part of the model (LoRA: the adapters); the optimizer state
    is the optimizer's, whose parameters are then exactly those.
    """
    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, iteration)
    model_state = model_sharded_state(chunks)
    state = select(model_state, keep)
    if save_optim:
        state["optimizer"] = _optimizer_state(optimizer, model_state, is_loading=False)
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_sharded_object()
    state.update(
        iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, consumed_train_samples=consumed_samples,
        **{RECORD_KEY: {"has_optimizer": save_optim, "world_size": dist.get_world_size(), **(extra or {})}},
    )
    with StagedOutput(final, force=True) as staging:
        dist_checkpointing.save(sharded_state_dict=state, checkpoint_dir=str(staging))
    if dist.get_rank() == 0:
        _write_side_files(save_dir, side_files_from, hf_config)
        write_tracker(save_dir, iteration)
    dist.barrier()
    return final


def _write_side_files(save_dir: Path, source: str | Path | None, hf_config: dict | None) -> None:
    """Tokenizer and config beside the checkpoints (once), so the save directory converts to HF as is."""
    elsewhere = source is not None and Path(source).resolve() != save_dir.resolve()
    if elsewhere and not (save_dir / "tokenizer.json").exists():
        copy_side_files(source, save_dir)
    if hf_config is not None and not (save_dir / "config.json").exists():
        (save_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def load_checkpoint(load_dir, chunks, optimizer, scheduler, load_optim: bool = True,
                    keep: KeyFilter | None = None, arch: Qwen3Arch | None = None) -> LoadedState:
    """Load weights (always) and, from our own saves, optimizer, schedule, RNG and data position.

    ``keep(checkpoint_key)`` loads only part of the model (the rest keeps its values). An HF model
    directory gives weights only, through the mapping of ``arch`` (default: its own config.json).
    """
    if is_hf_model_dir(load_dir):
        path = load_hf_model(load_dir, chunks, arch or Qwen3Arch.from_hf_dir(load_dir), keep)
        if optimizer is not None:  # its main (fp32) copies were made from the initial weights
            optimizer.reload_model_params()
        return LoadedState(source=str(path), hf=True)
    resolved = resolve_checkpoint(load_dir)
    common = common_state(resolved.path)
    info = common.get(RECORD_KEY, {})
    resume = not resolved.release and load_optim and info.get("has_optimizer", False)
    model_state = model_sharded_state(chunks)
    state = select(model_state, keep)
    if resume:
        state["optimizer"] = _optimizer_state(optimizer, model_state, is_loading=True)
        if info.get("world_size") == dist.get_world_size():
            state["rng_state"] = _rng_sharded_object()
    loaded = load_sharded(resolved.path, state)
    load_into(chunks, loaded, state, partial=keep is not None)
    if not resume:
        if optimizer is not None:  # its main (fp32) copies were made from the initial weights
            optimizer.reload_model_params()
        return LoadedState(source=str(resolved.path))
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return LoadedState(
        iteration=int(common["iteration"]), consumed_samples=int(common.get("consumed_train_samples", 0)),
        resumed=True, source=str(resolved.path),
    )
