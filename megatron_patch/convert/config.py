"""The converter's settings as one typed value (flags map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.models.qwen3.builder import PRECISIONS as _PRECISION_DTYPES

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
