"""What the training loop reports: throughput, model FLOPs and MFU, MoE aux loss and expert load.

Model FLOPs per token (docs/training.md has the derivation), counting only the experts a token
is routed to:

    6 * N_active_matmul  +  6 * L * s * (heads * head_dim)

N_active_matmul is the active parameters that take part in matrix multiplies (attention and
MLP/expert projections, router, output layer; not the input embedding or norms); the second
term is causal attention (QK^T and AV, forward and backward) at sequence length s. At s=4096
this gives 23.08 GFLOP/token for Qwen3-30B-A3B, the figure published runs imply.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Peak dense bf16 TFLOP/s by device name (vendor figures); MFU is n/a elsewhere unless --peak-tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
                    "B200": 2250.0, "GB200": 2500.0, "L40S": 362.0}


def model_flops_per_token_parts(arch, seq_length: int) -> tuple[float, float]:
    """(matmul, attention) training FLOPs per token: 6 x active matmul parameters, 6 x causal attention."""
    counts = arch.parameter_counts()
    norms = arch.num_layers * (2 * arch.hidden_size + 2 * arch.head_dim) + arch.hidden_size
    matmul = counts["active"] - counts["embedding"] - norms
    if arch.tie_word_embeddings:
        matmul += counts["embedding"]  # the tied output layer still multiplies
    attention = arch.num_layers * seq_length * arch.num_attention_heads * arch.head_dim
    return 6.0 * matmul, 6.0 * attention


def model_flops_per_token(arch, seq_length: int) -> float:
    return sum(model_flops_per_token_parts(arch, seq_length))


def memory_peak_gib() -> float | None:
    """This process's peak allocated GPU memory so far (what the memory plan's "allocated" predicts); None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def device_peak_tflops(override: float | None = None) -> float | None:
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


class ExpertLoad:
    """Tokens routed to each expert of each layer, counted by forward hooks on Megatron-Core's routers."""

    def __init__(self, chunks, num_layers: int, num_experts: int, duplicate_factor: int = 1):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        # Without sequence parallelism the TP ranks of a layer route the same tokens.
        self.duplicate_factor = duplicate_factor
        self.handles = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.handles.append(module.register_forward_hook(self._hook(module.layer_number - 1)))

    def _hook(self, layer: int):
        def record(module, inputs, output):
            if module.training:
                routing_map = output[1]
                self.counts[layer] += routing_map.detach().sum(dim=0).to("cpu", torch.float64)
        return record

    def collect(self) -> torch.Tensor:
        """[layers, experts] fraction of routed tokens, summed over all ranks since the last call."""
        counts = self.counts.clone()
        if dist.is_initialized():
            device = "cuda" if torch.cuda.is_available() else "cpu"
            counts = counts.to(device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        self.counts.zero_()
        counts /= self.duplicate_factor
        totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
        return counts / totals


def collect_aux_loss(num_microbatches: int) -> float | None:
    """Mean load-balancing loss per MoE layer over the iteration (Megatron-Core's tracker), then cleared."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:
        return None
    reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    values = tracker["load_balancing_loss"]["values"]
    layers = int((values != 0).sum().item()) or 1
    value = float(values.sum().item()) / num_microbatches / layers
    clear_aux_losses_tracker()
    return value


class MetricsWriter:
    """Per-iteration metrics to stdout, ``metrics.jsonl`` and TensorBoard (rank 0 only)."""

    def __init__(self, log_dir: str | None, tensorboard_dir: str | None, enabled: bool):
        self.enabled = enabled
        self.jsonl = self.tensorboard = None
        if not enabled:
            return
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir, max_queue=1)

    def write(self, iteration: int, values: dict, expert_load: torch.Tensor | None = None, line: str | None = None):
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        record = {"iteration": iteration, **{k: v for k, v in values.items() if v is not None}}
        if expert_load is not None:
            record["expert_load"] = [[round(x, 6) for x in row] for row in expert_load.tolist()]
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, iteration)
            if expert_load is not None:
                for layer, row in enumerate(expert_load):
                    # max/mean load: 1.0 is perfectly balanced.
                    self.tensorboard.add_scalar(f"expert_load_imbalance/layer_{layer}",
                                                float(row.max() / row.mean().clamp(min=1e-12)), iteration)
            self.tensorboard.flush()

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()


class Stopwatch:
    def __init__(self):
        self.started = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        return elapsed
