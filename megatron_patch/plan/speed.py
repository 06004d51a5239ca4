"""An optimizer step's time, estimated: FLOPs at a stated efficiency plus communication over links.

Per GPU and step (docs/planner.md states each formula and what it leaves out):
- compute: the step's tokens x model FLOPs per token (6 x active matmul parameters + causal
  attention, as Megatron-LM's throughput and the published A3B figures count them) / GPUs, at
  ``efficiency`` x peak; full recompute adds a forward pass (x 8/6), LoRA drops the frozen weights'
  gradients (4 of the 6);
- pipeline bubble: (PP - 1) / (micro-batches x virtual stages) of the compute (1F1B);
- TP (with SP: all-gather + reduce-scatter, an all-reduce's volume) around attention and every MLP,
  forward and backward: 4 x 2(TP-1)/TP x micro-batch hidden states per layer; never hidden;
- EP all-to-all: dispatch and combine, forward and backward, of every routed token's hidden state
  (the share for GPUs on other nodes over the network, the rest over NVLink);
- CP: ring attention passes each rank's K and V around the group, forward and backward;
- DP: the gradient reduce-scatter and parameter all-gather of the distributed optimizer (an
  all-reduce without it), overlapped with the backward pass: only what exceeds it counts;
- optimizer offload: the offloaded state's Adam update on the host and its PCIe round trip;
- GRPO: generation (prefill FLOPs; each decode step reads the rank's weights and KV cache from HBM),
  the reference model's forward when the KL term is on, then the update.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.plan.cluster import Cluster
from megatron_patch.training.config import TrainConfig
from megatron_patch.training.memory import StaticMemory
from megatron_patch.training.memory_plan import RolloutShape
from megatron_patch.training.metrics import model_flops_per_token_parts

GB = 1e9
# Host-side Adam (Megatron-Core's HybridDeviceOptimizer on the CPU) and the PCIe link: assumptions.
HOST_ADAM_ELEMENTS_PER_SECOND = 1.0e9
PCIE_GBPS = 25.0
# Per decode step and MoE/TP layer: a collective's latency, which dominates small decode messages.
COLLECTIVE_LATENCY_SECONDS = 20e-6


@dataclass(frozen=True)
class StepTime:
    parts: dict[str, float]  # seconds per step, by part
    tokens: int  # tokens the step trains on, all GPUs together

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    def tokens_per_gpu_second(self, gpus: int) -> float:
        return self.tokens / self.seconds / gpus


def _all_to_all(volume: float, size: int, cluster: Cluster, span: int) -> float:
    """Seconds of an all-to-all of ``volume`` bytes per rank over a group of ``size`` spread over ``span``
    consecutive GPUs: the share bound for other nodes crosses the network, the rest NVLink, at once."""
    if size <= 1:
        return 0.0
    per_node = max(1, size * min(span, cluster.gpus_per_node) // span)
    inside, outside = (per_node - 1) / size, (size - per_node) / size
    return max(volume * inside / (cluster.nvlink_gbps * GB), volume * outside / (cluster.network_gbps * GB))


def _ring(volume: float, size: int, gbps: float, all_reduce: bool = False) -> float:
    """Seconds of a ring collective moving ``volume`` bytes per rank over a group of ``size``."""
    if size <= 1:
        return 0.0
    return volume * (2 if all_reduce else 1) * (size - 1) / size / (gbps * GB)


def step_time(config: TrainConfig, arch: Qwen3Arch, cluster: Cluster, static: StaticMemory,
              rollout: RolloutShape | None = None, kl: bool = False) -> StepTime:
    layout = config.parallel_layout(arch)
    world, tp, pp, cp, ep, etp = cluster.gpus, layout.tp, layout.pp, layout.cp, layout.ep, layout.etp
    dp = layout.data_parallel_size(world)
    micro_batches = config.micro_batches(dp)
    tokens = config.global_batch_size * config.seq_length
    matmul, attention = model_flops_per_token_parts(arch, config.seq_length)
    if config.lora_rank:
        matmul *= 4 / 6  # no weight gradients for the frozen base
    flops_per_token = (matmul + attention) * (8 / 6 if config.recompute == "full" else 1)  # a second forward
    flops_per_second = cluster.peak_tflops * 1e12 * cluster.efficiency
    compute = tokens * flops_per_token / world / flops_per_second
    parts = {"compute": compute}
    virtual = layout.virtual_pp or 1
    parts["pipeline bubble"] = compute * (pp - 1) / (micro_batches * virtual)

    layers_here = arch.num_layers / pp
    moe_share = sum(arch.moe_layer_pattern) / arch.num_layers if arch.is_moe else 0.0
    passes = 3 if config.recompute == "full" else 2  # forward (again, when recomputed) and backward
    hidden_bytes = config.micro_batch_size * config.seq_length / cp * arch.hidden_size * 2
    # Attention always, and the MLP unless its experts skip TP (ETP 1): all-gather + reduce-scatter per pass.
    tp_blocks = layers_here * (1 + (1 - moe_share) + (moe_share if etp == tp else 0))
    parts["tensor parallel"] = micro_batches * tp_blocks * passes * _ring(
        hidden_bytes, tp, cluster.link_gbps(tp), all_reduce=True)
    if arch.is_moe and ep > 1:
        local_tokens = config.micro_batch_size * config.seq_length / cp / (tp if layout.sequence_parallel else 1)
        routed = local_tokens * arch.moe_topk * arch.hidden_size * 2
        parts["expert all-to-all"] = micro_batches * layers_here * moe_share * 2 * passes * _all_to_all(
            routed, ep, cluster, ep * etp)
    if cp > 1:  # ring attention passes every rank's K and V chunk around the CP group, forward and backward
        kv_bytes = config.micro_batch_size * config.seq_length / cp * 2 * arch.num_query_groups // tp \
            * arch.head_dim * 2
        parts["context parallel"] = micro_batches * layers_here * passes * (cp - 1) * kv_bytes \
            / (cluster.link_gbps(tp * cp) * GB)
    stage_ranks = world // pp
    if pp > 1:
        boundary = hidden_bytes / (tp if layout.sequence_parallel else 1)
        parts["pipeline send"] = micro_batches * 2 * boundary / (cluster.link_gbps(stage_ranks + 1) * GB)
    distributed = config.uses_distributed_optimizer
    grad_bytes = static.gradients
    weight_bytes = static.weights if distributed else 0
    expert_dp = layout.expert_data_parallel_size(world)
    expert_share = static.expert_weights / max(static.weights, 1)
    dense_dp, link = dp * cp, cluster.link_gbps(stage_ranks)
    data_parallel = 0.0
    for share, size in ((1 - expert_share, dense_dp), (expert_share, expert_dp)):
        if distributed:
            data_parallel += _ring(grad_bytes * share, size, link) + _ring(weight_bytes * share, size, link)
        else:
            data_parallel += _ring(grad_bytes * share, size, link, all_reduce=True)
    hidden_under = 2 / 3 * compute if config.overlap_grad_reduce else 0.0  # the backward pass
    parts["data parallel (exposed)"] = max(0.0, data_parallel - hidden_under)
    if static.optimizer_host:
        elements = static.optimizer_host / 12  # fp32 main weight and two moments each
        parts["optimizer offload"] = elements / HOST_ADAM_ELEMENTS_PER_SECOND + elements * 6 / (PCIE_GBPS * GB)
    if rollout is not None:
        parts.update(_rollout_time(arch, cluster, static, rollout, layout, dp, flops_per_second, kl))
    return StepTime({name: seconds for name, seconds in parts.items() if seconds}, tokens)


def _rollout_time(arch, cluster, static, rollout: RolloutShape, layout, dp: int, flops_per_second: float,
                  kl: bool) -> dict[str, float]:
    """Generation on each data-parallel rank, and the reference forward over the step's sequences."""
    active = arch.parameter_counts()["active"]
    sequences = rollout.sequences * dp  # the whole step's
    prefill = 2 * active * sequences * rollout.prompt_tokens / cluster.gpus / flops_per_second
    kv_per_token = 2 * arch.num_layers * arch.num_query_groups // layout.tp * arch.head_dim * 2
    average_kv = rollout.sequences * (rollout.prompt_tokens + rollout.response_tokens / 2) * kv_per_token
    read = (static.weights + average_kv) / (cluster.hbm_gbps * GB)
    latency = arch.num_layers * COLLECTIVE_LATENCY_SECONDS * (2 if layout.tp > 1 or layout.ep > 1 else 0)
    parts = {"rollout": prefill + rollout.response_tokens * (read + latency)}
    if kl:
        length = rollout.prompt_tokens + rollout.response_tokens
        parts["reference forward"] = 2 * active * sequences * length / cluster.gpus / flops_per_second
    return parts
