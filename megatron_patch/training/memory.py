"""Per-GPU memory of a training run, planned from its settings alone: nothing is built.

Static memory (weights, gradient buffers, optimizer state) is exact for the kit's torch and local
specs on Megatron-Core 0.16.1; tests compare it byte for byte with what Megatron-Core allocates.
What it reproduces:
- ``DistributedDataParallel`` keeps one buffer per parameter dtype (fp32 gradients: the kit sets
  ``grad_reduce_in_fp32``) for the dense parameters, and a second set for the expert parameters,
  which it reduces over the expert-data-parallel group. With the distributed optimizer every
  parameter starts on a 64-element boundary, every bucket ends on a multiple of lcm(DP, 128), the
  weights live inside the buffer, and a tied embedding split over pipeline stages is a bucket of
  its own. Buckets hold about 40M elements on the first chunk of the first stage, one bucket elsewhere.
- The distributed optimizer gives each data-parallel rank a 1/DP slice of every bucket: fp32 main
  copies of the bf16/fp16 weights in its slice (fp32 weights are their own main copies) and Adam's
  two moments. Without it every rank holds all of them.
Not counted: Adam's step counters (0-dim tensors on the host).
The Transformer-Engine spec keeps the same numbers of elements with bf16 norm weights and one
tensor per expert; its padding may differ by under 64 elements per tensor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from megatron_patch.lora.config import LoraSettings, adapted_shape
from megatron_patch.models.qwen3.arch import Qwen3Arch, padded_vocab_size
from megatron_patch.parallel import ParallelLayout
from megatron_patch.training.config import TrainConfig

FP32 = 4
# Bytes per weight element; fp8 training keeps bf16 weights (Transformer-Engine's fp8 GEMMs).
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}
# Megatron-Core 0.16.1 distributed/param_and_grad_buffer.py and distributed_data_parallel.py.
PARAM_ALIGNMENT = 64
BUCKET_ALIGNMENT = 128
MIN_BUCKET_SIZE = 40_000_000
BUCKET_SIZE_PER_DP_RANK = 1_000_000
# Adam's two moments, fp32.
ADAM_STATE_BYTES = 2 * FP32


@dataclass(frozen=True)
class Param:
    """One parameter tensor of one rank."""

    name: str
    numel: int
    itemsize: int
    expert: bool = False  # reduced over the expert-data-parallel group: DDP's expert buffers
    trainable: bool = True
    of_experts: bool = False  # an expert's weight or adapter (for the dense/expert split of the report)
    shared_embedding: bool = False  # a tied embedding split over pipeline stages: a bucket of its own


@dataclass(frozen=True)
class Bucket:
    start: int
    end: int
    params: tuple[tuple[int, int], ...]  # (start, end) of each parameter inside the buffer


@dataclass(frozen=True)
class Buffer:
    """One DDP parameter-and-gradient buffer."""

    itemsize: int
    expert: bool
    buckets: tuple[Bucket, ...]

    @property
    def numel(self) -> int:
        return self.buckets[-1].end if self.buckets else 0


@dataclass(frozen=True)
class StaticMemory:
    """Bytes one rank holds for the whole run (not counting activations)."""

    dense_weights: int  # everything but the experts' own weights, with the DDP buffers' padding
    expert_weights: int
    gradients: int
    optimizer: int  # on the GPU
    optimizer_host: int = 0  # moved to the CPU by --optimizer-offload-fraction

    @property
    def weights(self) -> int:
        return self.dense_weights + self.expert_weights


# ------------------------------------------------------------------------------------------ layers


def stage_layers(arch: Qwen3Arch, pp: int, pp_rank: int, first_stage_layers: int | None = None,
                 virtual_stages: int | None = None) -> list[list[int]]:
    """The layers of each model chunk of pipeline stage ``pp_rank`` (one chunk unless interleaved)."""
    layers = arch.num_layers
    if virtual_stages:
        per_chunk = layers // (pp * virtual_stages)
        return [list(range((chunk * pp + pp_rank) * per_chunk, (chunk * pp + pp_rank + 1) * per_chunk))
                for chunk in range(virtual_stages)]
    if first_stage_layers is not None and pp > 1:
        rest = (layers - first_stage_layers) // (pp - 1)
        start = 0 if pp_rank == 0 else first_stage_layers + (pp_rank - 1) * rest
        return [list(range(start, start + (first_stage_layers if pp_rank == 0 else rest)))]
    per_stage = layers // pp
    return [list(range(pp_rank * per_stage, (pp_rank + 1) * per_stage))]


@dataclass(frozen=True)
class ModelShape:
    """What decides the parameters of one rank: the model, the layout, the modules and LoRA."""

    arch: Qwen3Arch
    layout: ParallelLayout
    precision: str = "bf16"
    impl: str = "torch"  # torch or local exactly; transformer_engine approximately
    lora: LoraSettings | None = None

    @property
    def experts_apart(self) -> bool:
        """Expert parameters have their own buffers unless EP is 1 and ETP equals TP (patches/expert_grads.py)."""
        return not (self.layout.ep == 1 and self.layout.etp == self.layout.tp)

    def _weight(self, name: str, numel: int, expert: bool = False, shared: bool = False) -> Param:
        return Param(name, numel, WEIGHT_BYTES[self.precision], expert and self.experts_apart,
                     trainable=self.lora is None, of_experts=expert, shared_embedding=shared)

    def _norm(self, name: str, numel: int) -> Param:
        # torch.nn.RMSNorm (local spec) is created in fp32 whatever the model's dtype; TE's in params_dtype.
        itemsize = WEIGHT_BYTES[self.precision] if self.impl == "transformer_engine" else FP32
        return Param(name, numel, itemsize, trainable=self.lora is None)

    def _adapter(self, name: str, target: str, split: str, expert: bool, copies: int = 1) -> list[Param]:
        """LoRA factors A (rank x in) and B (out x rank); TP splits B of a column-parallel linear, A of a row one."""
        out_features, in_features = adapted_shape(self.arch, target, expert)
        tp = self.layout.etp if expert else self.layout.tp
        rank, size = self.lora.rank, WEIGHT_BYTES[self.precision]
        in_local = in_features // tp if split == "row" else in_features
        out_local = out_features // tp if split == "column" else out_features
        apart = expert and self.experts_apart
        return [Param(f"{name}.linear_in.weight", copies * rank * in_local, size, apart, of_experts=expert),
                Param(f"{name}.linear_out.weight", copies * out_local * rank, size, apart, of_experts=expert)]

    def _linear(self, name: str, target: str, out_local: int, in_local: int, split: str,
                expert: bool = False) -> list[Param]:
        params = [self._weight(f"{name}.weight", out_local * in_local, expert)]
        if self.lora is not None and target in self.lora.targets:
            params += self._adapter(f"{name}.adapter", target, split, expert)
        return params

    def layer_parameters(self, layer: int) -> list[Param]:
        """One decoder layer's parameters in Megatron-Core's module order (named_parameters)."""
        arch, tp = self.arch, self.layout.tp
        hidden, head = arch.hidden_size, arch.head_dim
        q, kv = arch.num_attention_heads * head, arch.num_query_groups * head
        prefix = f"decoder.layers.{layer}"
        params = [self._norm(f"{prefix}.input_layernorm.weight", hidden)]
        params += self._linear(f"{prefix}.self_attention.linear_proj", "linear_proj", hidden, q // tp, "row")
        params += self._linear(f"{prefix}.self_attention.linear_qkv", "linear_qkv", (q + 2 * kv) // tp, hidden,
                               "column")
        params += [self._norm(f"{prefix}.self_attention.q_layernorm.weight", head),
                   self._norm(f"{prefix}.self_attention.k_layernorm.weight", head),
                   self._norm(f"{prefix}.pre_mlp_layernorm.weight", hidden)]
        if not arch.layer_is_moe(layer):
            ffn = arch.ffn_hidden_size // tp
            params += self._linear(f"{prefix}.mlp.linear_fc1", "linear_fc1", 2 * ffn, hidden, "column")
            params += self._linear(f"{prefix}.mlp.linear_fc2", "linear_fc2", hidden, ffn, "row")
            return params
        return params + [self._weight(f"{prefix}.mlp.router.weight", arch.num_experts * hidden)] \
            + self._experts(f"{prefix}.mlp.experts")

    def _experts(self, prefix: str) -> list[Param]:
        arch, etp = self.arch, self.layout.etp
        local, hidden, ffn = arch.num_experts // self.layout.ep, arch.hidden_size, arch.moe_ffn_hidden_size // etp
        targets = self.lora.targets if self.lora is not None else ()
        if self.impl == "torch":  # GroupedGemmExperts: one stacked tensor per projection, adapters after them
            params = [self._weight(f"{prefix}.weight1", local * 2 * ffn * hidden, expert=True),
                      self._weight(f"{prefix}.weight2", local * hidden * ffn, expert=True)]
            for target, slot, split in (("linear_fc1", "fc1_adapter", "column"), ("linear_fc2", "fc2_adapter", "row")):
                if target in targets:
                    params += self._adapter(f"{prefix}.{slot}", target, split, expert=True, copies=local)
            return params
        params = []  # SequentialMLP (local) and TE: one tensor per expert and projection
        for expert in range(local):
            name = f"{prefix}.local_experts.{expert}"
            for target, out_local, in_local, split in (("linear_fc1", 2 * ffn, hidden, "column"),
                                                       ("linear_fc2", hidden, ffn, "row")):
                params.append(self._weight(f"{name}.{target}.weight", out_local * in_local, expert=True))
                if target in targets:
                    params += self._adapter(f"{name}.{target}.adapter", target, split, expert=True)
        return params

    def chunk_parameters(self, layers: list[int], pre_process: bool, post_process: bool) -> list[Param]:
        """A model chunk's parameters in module order: embedding, layers, final norm, output layer."""
        arch, pp = self.arch, self.layout.pp
        vocab_rows = padded_vocab_size(arch.vocab_size) // self.layout.tp
        split_tied = arch.tie_word_embeddings and pp > 1
        params = []
        if pre_process:
            params.append(self._weight("embedding.word_embeddings.weight", vocab_rows * arch.hidden_size,
                                       shared=split_tied and not post_process))
        for layer in layers:
            params += self.layer_parameters(layer)
        if post_process:
            params.append(self._norm("decoder.final_layernorm.weight", arch.hidden_size))
            if not (arch.tie_word_embeddings and pre_process):
                params.append(self._weight("output_layer.weight", vocab_rows * arch.hidden_size, shared=split_tied))
        return params


# ------------------------------------------------------------------------------------ DDP buffers


def _round_up(number: int, multiple: int) -> int:
    return -(-number // multiple) * multiple


def ddp_buffer(params: list[Param], dp: int, distributed: bool, bucket_size: int | None) -> Buffer:
    """Megatron-Core's layout of one buffer: parameters in reverse module order (backward's order)."""
    bucket_multiple = math.lcm(dp, BUCKET_ALIGNMENT)
    buckets, ranges = [], []
    start = bucket_start = end = 0

    def close(last: int) -> int:
        nonlocal bucket_start, ranges
        bucket_end = _round_up(last, bucket_multiple) if distributed else last
        buckets.append(Bucket(bucket_start, bucket_end, tuple(ranges)))
        bucket_start, ranges = bucket_end, []
        return bucket_end

    for param in reversed(params):
        if distributed:
            start = _round_up(start, PARAM_ALIGNMENT)
        own_bucket = param.shared_embedding and distributed
        if own_bucket and ranges:
            start = close(start)
        end = start + param.numel
        ranges.append((start, end))
        full = bucket_size is not None and end - bucket_start >= bucket_size
        start = close(end) if full or own_bucket else end
    if ranges:
        close(end)
    itemsize = params[0].itemsize if params else 0
    return Buffer(itemsize, bool(params) and params[0].expert, tuple(buckets))


def chunk_buffers(params: list[Param], dp: int, expert_dp: int, distributed: bool,
                  bucket_size: int | None) -> list[Buffer]:
    """The buffers of one DDP-wrapped chunk: per dtype, dense ones then expert ones."""
    buffers = []
    for expert, group_dp in ((False, dp), (True, expert_dp)):
        trainable = [p for p in params if p.trainable and p.expert == expert]
        for itemsize in dict.fromkeys(p.itemsize for p in trainable):
            same = [p for p in trainable if p.itemsize == itemsize]
            buffers.append(ddp_buffer(same, group_dp, distributed, bucket_size))
    return buffers


def _shard_elements(buffer: Buffer, dp: int, dp_rank: int) -> int:
    """Parameter elements (padding excluded) in ``dp_rank``'s 1/dp slice of every bucket."""
    total = 0
    for bucket in buffer.buckets:
        size = (bucket.end - bucket.start) // dp
        low = bucket.start + dp_rank * size
        high = low + size
        total += sum(max(0, min(end, high) - max(start, low)) for start, end in bucket.params)
    return total


def _main_and_moments(elements: int, itemsize: int) -> int:
    """Adam state of ``elements`` trained weights: fp32 main copies of 16-bit weights, and two moments."""
    return elements * (ADAM_STATE_BYTES + (FP32 if itemsize < FP32 else 0))


# ------------------------------------------------------------------------------------ per rank


@dataclass(frozen=True)
class Ranks:
    """Where one process sits in the layout (what differs between ranks' memory)."""

    pp_rank: int = 0
    dp_rank: int = 0  # within the data-and-context-parallel group
    expert_dp_rank: int = 0


@functools.lru_cache(maxsize=4096)  # the planner asks for the same layout under many batch settings
def static_memory(shape: ModelShape, world_size: int, ranks: Ranks = Ranks(), distributed_optimizer: bool = True,
                  overlap_grad_reduce: bool = True, first_stage_layers: int | None = None,
                  optimizer_offload_fraction: float = 0.0) -> StaticMemory:
    """The weights, gradient buffers and optimizer state one rank allocates."""
    layout = shape.layout
    # DDP reduces the dense buffers over DP x CP, the expert buffers over the expert-data-parallel group.
    dp, expert_dp = layout.data_parallel_size(world_size) * layout.cp, layout.expert_data_parallel_size(world_size)
    bucket_size = max(MIN_BUCKET_SIZE, BUCKET_SIZE_PER_DP_RANK * (dp // layout.cp)) if overlap_grad_reduce \
        else None
    chunks = stage_layers(shape.arch, layout.pp, ranks.pp_rank, first_stage_layers, layout.virtual_pp)
    weights = experts = gradients = optimizer = 0
    for index, layers in enumerate(chunks):
        pre = ranks.pp_rank == 0 and index == 0
        post = ranks.pp_rank == layout.pp - 1 and index == len(chunks) - 1
        params = shape.chunk_parameters(layers, pre, post)
        experts += sum(p.numel * p.itemsize for p in params if p.of_experts)
        # Megatron-Core buckets only the first chunk of the first pipeline stage.
        chunk_bucket = bucket_size if index == 0 and ranks.pp_rank == 0 else None
        buffers = chunk_buffers(params, dp, expert_dp, distributed_optimizer, chunk_bucket)
        if distributed_optimizer:  # the trained weights live in the buffers, padding included
            weights += sum(b.numel * b.itemsize for b in buffers)
            weights += sum(p.numel * p.itemsize for p in params if not p.trainable)
            for buffer in buffers:
                group_dp, rank = (expert_dp, ranks.expert_dp_rank) if buffer.expert else (dp, ranks.dp_rank)
                optimizer += _main_and_moments(_shard_elements(buffer, group_dp, rank), buffer.itemsize)
        else:
            weights += sum(p.numel * p.itemsize for p in params)
            optimizer += sum(_main_and_moments(p.numel, p.itemsize) for p in params if p.trainable)
        gradients += sum(b.numel * FP32 for b in buffers)
    host = int(optimizer * optimizer_offload_fraction)
    return StaticMemory(weights - experts, experts, gradients, optimizer - host, host)


# ------------------------------------------------------------------------------ a run's settings


def run_shape(config: TrainConfig, arch: Qwen3Arch, impl: str) -> ModelShape:
    lora = LoraSettings(config.lora_rank, config.lora_alpha, config.lora_dropout,
                        tuple(config.lora_target_modules)) if config.lora_rank else None
    return ModelShape(arch, config.parallel_layout(arch), config.precision, impl, lora)


def run_static_memory(config: TrainConfig, arch: Qwen3Arch, impl: str, world_size: int,
                      ranks: Ranks = Ranks()) -> StaticMemory:
    """A run's static memory on ``ranks`` (the first data-parallel rank by default: the padding at each
    bucket's end leaves the last ranks the fewest elements)."""
    return static_memory(run_shape(config, arch, impl), world_size, ranks, config.uses_distributed_optimizer,
                         config.overlap_grad_reduce, config.decoder_first_pipeline_num_layers,
                         config.optimizer_offload_fraction or 0.0)
