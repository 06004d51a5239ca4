"""A training step on Megatron-Core's own machinery: DDP, (distributed) optimizer, pipeline schedules.

This is the core that the full training loop (``megatron_patch.train``) builds
on; it wires Megatron-Core's pieces the way Megatron-LM does: the optimizer
scales the loss, DDP's ``no_sync`` wraps micro-batches, and
``finalize_model_grads`` reduces gradients (and tied/embedding grads across
pipeline stages) before the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    # Fraction of optimizer state kept on the CPU (Megatron-Core's HybridDeviceOptimizer); GPU runs only.
    cpu_offload_fraction: float | None = None


def wrap_with_ddp(model_chunks, use_distributed_optimizer: bool = True, overlap_grad_reduce: bool = False,
                  overlap_param_gather: bool = False):
    """Megatron-Core ``DistributedDataParallel`` around each chunk (fp32 gradient buffers).

    With ``overlap_param_gather`` the updated parameters are all-gathered lazily, by forward
    pre-hooks during the next forward pass: read weights outside a forward only after
    ``synchronized_parameters``.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather and use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return [
        DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0
        )
        for index, chunk in enumerate(chunks)
    ]


@contextmanager
def synchronized_parameters(ddp_chunks):
    """Parameters all-gathered and current inside the block (for saving), lazily gathered again after.

    With overlapped parameter gathering the optimizer step leaves each rank holding only its own
    shard's update until the next forward pass; a checkpoint written then would hold stale weights.
    """
    lazy = [chunk for chunk in ddp_chunks if chunk.use_forward_hook]
    for chunk in lazy:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in lazy:
            chunk.enable_forward_pre_hook()


def build_optimizer(ddp_chunks, settings: OptimizerSettings = OptimizerSettings()):
    """Megatron-Core's optimizer (Adam, fp32 main params; distributed when asked) wired into the chunks' config."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_config = ddp_chunks[0].config
    offload = settings.cpu_offload_fraction is not None
    optimizer = get_megatron_optimizer(
        config=OptimizerConfig(
            optimizer="adam",
            lr=settings.lr,
            min_lr=settings.min_lr,
            weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1,
            adam_beta2=settings.adam_beta2,
            clip_grad=settings.clip_grad,
            bf16=model_config.bf16,
            fp16=model_config.fp16,
            params_dtype=model_config.params_dtype,
            use_distributed_optimizer=settings.use_distributed_optimizer or offload,
            optimizer_cpu_offload=offload,
            optimizer_offload_fraction=settings.cpu_offload_fraction or 0.0,
            use_precision_aware_optimizer=offload,
        ),
        model_chunks=ddp_chunks,
    )
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    model_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return optimizer


def masked_token_loss(output_tensor: torch.Tensor, loss_mask: torch.Tensor):
    """Loss function for the schedules: (sum of masked token losses, token count, report)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    total = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), tokens.float()])}


def packed_seq_params(batch: dict):
    """Megatron-Core's THD description of a packed batch (``collate(..., "thd")``), else None."""
    if "cu_seqlens" not in batch:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch["cu_seqlens"], cu_seqlens_kv=batch["cu_seqlens"],
                           max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])


def lm_forward_step(data_iterator: Iterator, model):
    """Forward step for batches of dicts with tokens, labels, loss_mask, position_ids (+ packing)."""
    batch = next(data_iterator)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        # None: causal. Packed SFT batches carry cu_seqlens (THD) or, for the local attention, a block mask.
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        packed_seq_params=packed_seq_params(batch),
    )
    return output, lambda output_tensor: masked_token_loss(output_tensor, batch["loss_mask"])


def train_step(
    ddp_chunks,
    optimizer,
    data_iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step: Callable = lm_forward_step,
) -> dict:
    """One optimizer step over ``num_microbatches`` micro-batches; returns loss, grad norm and success."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in ddp_chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=ddp_chunks if len(ddp_chunks) > 1 else ddp_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    loss = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        summed = torch.stack([r["lm loss"] for r in reports]).sum(dim=0)
        torch.distributed.all_reduce(summed, group=parallel_state.get_data_parallel_group())
        loss = (summed[0] / summed[1]).item()
    # reports: what the loss function reported per micro-batch (last pipeline stage).
    return {"loss": loss, "grad_norm": grad_norm, "update_successful": update_successful, "reports": reports}


def lm_batch(tokens: torch.Tensor) -> dict:
    """A next-token-prediction batch from a [batch, seq+1] token tensor, every position trained."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return {
        "tokens": inputs,
        "labels": labels,
        "loss_mask": torch.ones_like(labels, dtype=torch.float32),
        "position_ids": torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs),
    }
