"""What Megatron-Core allocates for a training run, next to what training/memory.py plans for it.

``measure(argv)`` builds the run as the trainer does (``prepare_model``: model, LoRA, DDP, optimizer),
takes one optimizer step so that Adam's state exists, and counts the bytes of every distinct storage:
weights (parameters, DDP parameter buffers), gradients (DDP gradient buffers) and optimizer state
(main parameters and Adam's moments; 0-dim step counters aside). Each rank returns
{"measured": ..., "planned": ...}; as a "memory" job of workers/batch.py rank 0 prints all ranks' as JSON.
"""

import json

import torch
import torch.distributed as dist


def allocated_bytes(model) -> dict[str, int]:
    """Bytes per kind of every distinct storage the run's modules, DDP buffers and optimizer hold."""
    kinds: dict[int, tuple[str, int]] = {}

    def count(kind: str, tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.nbytes():
            kinds.setdefault(storage.data_ptr(), (kind, storage.nbytes()))

    for chunk in model.ddp_chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if buffer.param_data is not None:
                count("weights", buffer.param_data)
            count("gradients", buffer.grad_data)
    for chunk in model.chunks:
        for parameter in chunk.parameters():
            count("weights", parameter)
    for optimizer in getattr(model.optimizer, "chained_optimizers", [model.optimizer]):
        for group in optimizer.optimizer.param_groups:
            for parameter in group["params"]:
                count("optimizer", parameter)
        for state in optimizer.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    count("optimizer", value)
    totals = {"weights": 0, "gradients": 0, "optimizer": 0}
    for kind, size in kinds.values():
        totals[kind] += size
    return totals


def measure(argv) -> dict:
    from megatron.core import parallel_state

    from megatron_patch.training.config import parse_config
    from megatron_patch.training.memory import Ranks, run_static_memory
    from megatron_patch.training.setup import prepare_model

    config, _ = parse_config(argv)
    model = prepare_model(config)
    model.optimizer.zero_grad()
    model.optimizer.step()  # Adam's moments exist from the first step on
    ranks = Ranks(pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                  dp_rank=parallel_state.get_data_parallel_rank(with_context_parallel=True),
                  expert_dp_rank=parallel_state.get_expert_data_parallel_rank())
    planned = run_static_memory(config, model.arch, model.impl, dist.get_world_size(), ranks)
    return {"measured": allocated_bytes(model),
            "planned": {"weights": planned.weights, "gradients": planned.gradients, "optimizer": planned.optimizer}}


def run(argv) -> None:
    mine = measure(argv)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    print(json.dumps(every), flush=True)
