"""A run's peak memory per GPU, by part: what ``python -m megatron_patch.plan`` tabulates and
``MP_DRY_RUN=true`` prints before a launch.

The peak of a pipeline stage is its static memory (training/memory.py: exact) plus the activations of
the micro-batches in flight there (training/activations.py), plus what lives only briefly: the
logits and their gradient around the loss, one recompute group rebuilt during its backward pass,
and for GRPO the rollout's KV cache and prefill (the rollout and the update do not overlap, so
the larger phase counts). A fixed overhead stands for what ``torch.cuda.max_memory_allocated``
does not see. Every stage is planned; the run's peak is the worst stage's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_patch.models.qwen3.arch import Qwen3Arch, padded_vocab_size
from megatron_patch.training.activations import (
    BF16,
    Tokens,
    chunk_bytes,
    layer_bytes,
    logits_transient_bytes,
    loss_bytes,
    recompute_working_bytes,
)
from megatron_patch.training.config import TrainConfig
from megatron_patch.training.memory import FP32, Ranks, StaticMemory, run_shape, run_static_memory, stage_layers

GIB = 1 << 30
# CUDA context and kernels (~0.5 GiB), NCCL communicators and their buffers (~1 GiB) and the caching
# allocator's slack: an assumption, to be replaced by GPU measurements (docs/planner.md).
FIXED_OVERHEAD = 2 * GIB


@dataclass(frozen=True)
class RolloutShape:
    """GRPO's rollout on one data-parallel rank: its sequences, at most ``sequences`` at a time."""

    sequences: int  # generated at once: prompts x samples per prompt on this rank, or --rollout-batch
    prompt_tokens: int  # the longest prompt
    response_tokens: int
    log_prob_chunk: int  # tokens per chunk of the fp32 log-prob computation
    reference_on_host: bool  # full fine-tuning with a KL term keeps the reference weights in CPU memory
    refills: bool = False  # more sequences than fit at once: finished ones' slots take the next (continuous batching)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU on the worst pipeline stage, by part (they sum to the peak), and in CPU memory."""

    stage: int
    phase: str  # "training", or "rollout" when GRPO's generation needs more
    parts: dict[str, int]
    static: StaticMemory  # the stage's, as parts of its own (the speed estimate reads its buffers)
    host: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated would report: the peak without the fixed overhead."""
        return self.peak - self.parts.get("fixed overhead", 0)

    def lines(self) -> list[str]:
        width = max(len(name) for name in self.parts)
        rows = [f"  {name:<{width}}  {size / GIB:8.2f} GiB" for name, size in self.parts.items() if size]
        rows.append(f"  {'peak':<{width}}  {self.peak / GIB:8.2f} GiB (pipeline stage {self.stage}, {self.phase})")
        rows += [f"  host: {name} {size / GIB:.2f} GiB" for name, size in self.host.items() if size]
        return rows


def micro_batches_in_flight(pp: int, stage: int, micro_batches: int, virtual_stages: int | None) -> float:
    """Micro-batches whose activations a stage holds at once under 1F1B (in whole-stage units)."""
    if pp == 1:
        return 1.0
    if not virtual_stages:
        return float(min(pp - stage, micro_batches))
    # Interleaved: Megatron-Core's warm-up count of chunk-micro-batches, plus the one in flight.
    chunks = min(micro_batches * virtual_stages, (pp - stage - 1) * 2 + (virtual_stages - 1) * pp + 1)
    return chunks / virtual_stages


def _training_phase(config: TrainConfig, shape, stage: int, tokens: Tokens, micro_batches: int,
                    rollout: RolloutShape | None) -> dict[str, int]:
    layout = shape.layout
    chunks = stage_layers(shape.arch, layout.pp, stage, config.decoder_first_pipeline_num_layers, layout.virtual_pp)
    last = stage == layout.pp - 1
    recompute = "none" if config.recompute == "offload" else config.recompute
    per_micro_batch = sum(chunk_bytes(shape, layers, tokens, recompute, config.recompute_num_layers,
                                      stage == 0 and index == 0, False) for index, layers in enumerate(chunks))
    if config.recompute == "offload":  # the first N layers' activations go to the host (TE's, or save_on_cpu)
        offloaded = sorted(layer for layers in chunks for layer in layers)[:config.recompute_num_layers]
        per_micro_batch -= sum(layer_bytes(shape, layer, tokens, "none") for layer in offloaded)
    in_flight = micro_batches_in_flight(layout.pp, stage, micro_batches, layout.virtual_pp)
    parts = {"activations": int(per_micro_batch * in_flight)}
    if config.recompute == "full":
        parts["recompute working set"] = max(
            recompute_working_bytes(shape, layers, tokens, config.recompute_num_layers) for layers in chunks)
    if last:
        if rollout is None:
            parts["loss and logits"] = loss_bytes(shape, tokens) + logits_transient_bytes(shape, tokens)
        else:  # log-probs in checkpointed chunks: one chunk's bf16 logits, fp32 copy and gradient at a time
            vocab = padded_vocab_size(shape.arch.vocab_size) // layout.tp
            parts["loss and logits"] = rollout.log_prob_chunk * vocab * (BF16 + 2 * FP32)
    return parts


def _rollout_phase(shape, rollout: RolloutShape) -> dict[str, int]:
    """Generation: the KV cache, and what the prefill (every prompt at once, no gradients) holds besides."""
    arch, layout = shape.arch, shape.layout
    span = rollout.prompt_tokens + rollout.response_tokens
    # models/generation.py: a scratch row besides the sequences' and, with refills, half a span more positions.
    capacity = span + span // 2 if rollout.refills else span
    rows = rollout.sequences + 1
    kv_heads = arch.num_query_groups // layout.tp
    prompts = Tokens(rollout.prompt_tokens, rollout.sequences)
    # Megatron-Core's static inference context materialises only the last position's logits (gathered
    # over TP, then fp32); the prefill's mask is one byte per pair of prompt tokens; a layer's
    # intermediate tensors live one layer at a time.
    last_logits = rollout.sequences * padded_vocab_size(arch.vocab_size) * (BF16 + FP32)
    mask = rollout.sequences * rollout.prompt_tokens ** 2
    working = max(layer_bytes(shape, layer, prompts, "none") for layer in range(arch.num_layers))
    return {
        "rollout KV cache": 2 * arch.num_layers * rows * capacity * kv_heads * arch.head_dim * BF16,
        "rollout prefill": last_logits + mask + working,
    }


def plan_memory(config: TrainConfig, arch: Qwen3Arch, impl: str, world_size: int,
                rollout: RolloutShape | None = None) -> MemoryPlan:
    """The peak per GPU of a run with these settings on ``world_size`` GPUs (the worst pipeline stage)."""
    shape = run_shape(config, arch, impl)
    layout = shape.layout
    micro_batches = config.micro_batches(layout.data_parallel_size(world_size))
    tokens = Tokens(config.seq_length // layout.cp, config.micro_batch_size, layout.sequence_parallel, layout.tp)
    plans = []
    for stage in range(layout.pp):
        static = run_static_memory(config, arch, impl, world_size, Ranks(pp_rank=stage))
        parts = {"weights (dense)": static.dense_weights, "weights (experts)": static.expert_weights,
                 "gradients": static.gradients, "optimizer": static.optimizer}
        phase, extra = "training", _training_phase(config, shape, stage, tokens, micro_batches, rollout)
        if rollout is not None:
            generation = _rollout_phase(shape, rollout)
            if sum(generation.values()) > sum(extra.values()):
                phase, extra = "rollout", generation
        host = {"optimizer (offloaded)": static.optimizer_host}
        if rollout is not None and rollout.reference_on_host:
            host["reference weights"] = static.weights
        plans.append(MemoryPlan(stage, phase, {**parts, **extra, "fixed overhead": FIXED_OVERHEAD}, static, host))
    return max(plans, key=lambda plan: plan.peak)
