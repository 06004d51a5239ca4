"""The converter's settings as one typed value (flags map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.errors import InputError
from megatron_patch.parallel import ParallelLayout


class ConversionError(InputError):
    """A conversion that cannot be done as asked; the message names the file or setting."""


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
    only_own: bool = False  # with force: replace only a directory the kit wrote (StagedOutput)
    made_from: str | None = None  # recorded in the output's manifest (an HF export: the save it came from)
    verify: bool = False
    check_finite: bool = False
    use_cuda: bool = False
    # The layout the checkpoint is meant for (Pai's MODEL_PARALLEL_ARGS). torch_dist does not
    # depend on it; it is checked against the model and recorded in the checkpoint.
    layout: ParallelLayout = ParallelLayout()
