"""Helpers the tests share (kept out of the library: nothing in megatron_patch needs them)."""

from __future__ import annotations

import torch

from megatron_patch.training.steps import OptimizerSettings, build_optimizer, lm_batch, train_step, wrap_with_ddp


def train_on_fixed_batch(model_chunks, tokens: torch.Tensor, steps: int, lr: float = 1e-3, num_microbatches: int = 2):
    """Smoke-train on one batch split into micro-batches; returns (loss per step, optimizer).

    Losses are reported on the last pipeline stage (None elsewhere).
    """
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    ddp_chunks = wrap_with_ddp(chunks)
    optimizer = build_optimizer(ddp_chunks, OptimizerSettings(lr=lr, weight_decay=0.0))
    micro_batches = [lm_batch(part) for part in torch.chunk(tokens, num_microbatches)]
    losses = []
    for _ in range(steps):
        data = [iter(micro_batches) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(micro_batches)
        result = train_step(
            ddp_chunks, optimizer, data, num_microbatches, tokens.shape[1] - 1, micro_batches[0]["tokens"].shape[0]
        )
        losses.append(result["loss"])
    return losses, optimizer
