"""The converter's settings as one typed value (flags map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import PRECISIONS as _PRECISION_DTYPES
from megatron_patch.parallel import ParallelLayout

PRECISIONS = tuple(_PRECISION_DTYPES)
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class ConvertConfig:
    load_dir: Path
    save_dir: Path
    mg2hf: bool = False
    hf_dir: Path | None = None
    model_size: str = "auto"
    precision: str = "bf16"
    max_shard_bytes: int = 5 << 30
    iteration: str | None = None
    force: bool = False
    verify: bool = False
    use_cuda: bool = False
    # The layout the checkpoint is meant for (Pai's MODEL_PARALLEL_ARGS). torch_dist does not
    # depend on it; it is checked against the model and recorded in the checkpoint.
    layout: ParallelLayout = ParallelLayout()


def layout_problems(arch: Qwen3Arch, layout: ParallelLayout) -> list[str]:
    """Why ``arch`` cannot run at ``layout`` (empty when it can)."""
    problems = []
    if arch.num_query_groups % layout.tp:
        problems.append(f"TP={layout.tp} does not divide num_key_value_heads={arch.num_query_groups}")
    if arch.num_layers % layout.pp:
        problems.append(f"PP={layout.pp} does not divide num_hidden_layers={arch.num_layers}")
    if arch.is_moe and arch.num_experts % layout.ep:
        problems.append(f"EP={layout.ep} does not divide num_experts={arch.num_experts}")
    if arch.is_moe and arch.moe_ffn_hidden_size % layout.etp:
        problems.append(f"ETP={layout.etp} does not divide moe_intermediate_size={arch.moe_ffn_hidden_size}")
    if not arch.is_moe and layout.ep > 1:
        problems.append(f"EP={layout.ep} needs an MoE model")
    return problems
