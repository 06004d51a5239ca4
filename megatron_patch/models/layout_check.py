"""Does this layout fit this model? One answer for the launcher, trainer, converter and evaluation.

``layout_problems(arch, layout, ...)`` lists every reason an (architecture, parallel layout,
implementation) triple cannot run, each in one line that names the setting by its training
flag (the launcher renames flags to Pai's positional arguments). An empty list means it fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.parallel import ParallelLayout


@dataclass(frozen=True)
class RunFeatures:
    """The parts of a run beyond the parallel sizes that decide whether it can run."""

    precision: str = "bf16"
    recompute: str = "none"  # a key of models.choices.RECOMPUTE_MODES
    recompute_num_layers: int = 1
    first_stage_layers: int | None = None  # --decoder-first-pipeline-num-layers
    layers_per_virtual_stage: int | None = None  # --num-layers-per-virtual-pipeline-stage
    lora: bool = False
    inference: bool = False  # forward only (evaluation): MoE with TP runs without sequence parallelism


def virtual_stages(num_layers: int, pp: int, layers_per_virtual_stage: int | None) -> int | None:
    """Model chunks per pipeline stage for interleaved 1F1B (None: not interleaved)."""
    if not layers_per_virtual_stage:
        return None
    chunks = num_layers // pp // layers_per_virtual_stage
    return chunks if chunks > 1 else None


def _pipeline_problems(arch: Qwen3Arch, pp: int, features: RunFeatures) -> list[str]:
    first, per_virtual = features.first_stage_layers, features.layers_per_virtual_stage
    if first is not None:
        if pp < 2:
            return ["--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size > 1"]
        problems = []
        if not 0 < first < arch.num_layers or (arch.num_layers - first) % (pp - 1):
            problems.append(f"--decoder-first-pipeline-num-layers {first}: the other {arch.num_layers - first} "
                            f"layers must split evenly over the remaining {pp - 1} pipeline stages")
        if per_virtual:
            problems.append("--decoder-first-pipeline-num-layers cannot be combined with virtual pipeline")
        return problems
    if arch.num_layers % pp:
        return [f"--pipeline-model-parallel-size {pp} does not divide the {arch.num_layers} layers"]
    problems = []
    if per_virtual and (pp < 2 or arch.num_layers // pp % per_virtual):
        problems.append(f"--num-layers-per-virtual-pipeline-stage {per_virtual} does not divide the "
                        f"{arch.num_layers} layers / --pipeline-model-parallel-size {pp}"
                        + (" (virtual pipeline needs --pipeline-model-parallel-size > 1)" if pp < 2 else ""))
    if features.recompute == "full" and arch.num_layers // pp % features.recompute_num_layers:
        problems.append(f"--recompute-num-layers {features.recompute_num_layers} must divide the "
                        f"{arch.num_layers // pp} layers per pipeline stage")
    return problems


def _expert_problems(arch: Qwen3Arch, layout: ParallelLayout, features: RunFeatures) -> list[str]:
    if not arch.is_moe:
        return [f"--expert-{kind}-parallel-size {size} needs an MoE model; this one is dense"
                for kind, size in (("model", layout.ep), ("tensor", layout.etp)) if size > 1]
    problems = []
    if arch.num_experts % layout.ep:
        problems.append(f"--expert-model-parallel-size {layout.ep} does not divide the {arch.num_experts} experts")
    if arch.moe_ffn_hidden_size % layout.etp:
        problems.append(f"--expert-tensor-parallel-size {layout.etp} does not divide the expert FFN size "
                        f"{arch.moe_ffn_hidden_size} (moe_intermediate_size)")
    if layout.tp > 1 and not layout.sequence_parallel and (layout.ep > 1 or not features.inference):
        # Megatron-Core's rule: TransformerConfig.__post_init__ (with EP > 1) and MoELayer.forward
        # (0.16.1, any training step) refuse MoE with TP and without SP; a forward-only model only with EP > 1.
        problems.append("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (SP=true)")
    return problems


def _engine_problems(layout: ParallelLayout, impl: str, features: RunFeatures) -> list[str]:
    """What only Transformer-Engine provides, and what our modules do not support on it."""
    if impl == "transformer_engine":
        return ["LoRA on the Transformer-Engine spec is not supported; use --transformer-impl torch or local"] \
            if features.lora else []
    problems = []
    if layout.cp > 1:
        problems.append("--context-parallel-size > 1 needs Transformer-Engine attention (not installed)")
    if features.precision == "fp8":
        problems.append("--precision fp8 needs Transformer-Engine (not installed)")
    return problems


def layout_problems(arch: Qwen3Arch, layout: ParallelLayout, impl: str = "torch",
                    features: RunFeatures = RunFeatures(), world_size: int | None = None) -> list[str]:
    """Every reason ``arch`` cannot run at ``layout`` with ``impl`` (resolved, not "auto"); empty when it can."""
    problems = []
    if layout.sequence_parallel and layout.tp == 1:
        problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if arch.num_attention_heads % layout.tp or arch.num_query_groups % layout.tp:
        problems.append(f"--tensor-model-parallel-size {layout.tp} does not divide the {arch.num_attention_heads} "
                        f"attention heads / {arch.num_query_groups} KV heads")
    problems += _pipeline_problems(arch, layout.pp, features)
    problems += _expert_problems(arch, layout, features)
    problems += _engine_problems(layout, impl, features)
    if world_size is not None:
        problems += layout.world_problems(world_size)
    return problems
