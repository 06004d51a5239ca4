"""Compare our Megatron-Core Qwen3 with transformers' on the same weights and tokens.

fp32: the logits must agree to rounding (max |diff| <= 1e-4).
bf16/fp16: both implementations round differently, so an absolute bound would
be arbitrary (bf16 keeps 8 mantissa bits; a near-tie in top-k routing may flip).
The rule instead: against the fp32 transformers logits, our low-precision
error is at most ``LOW_PRECISION_FACTOR`` times transformers' own error at
that precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_patch.models.choices import PRECISIONS
from megatron_patch.models.logits import forward_logits
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.qwen3.hf_model import load_hf_model
from megatron_patch.models.qwen3.loading import load_hf_weights

FP32_TOLERANCE = 1e-4
LOW_PRECISION_FACTOR = 1.5


@dataclass(frozen=True)
class ParityResult:
    precision: str
    max_abs_diff: float  # ours at `precision` vs transformers in fp32
    reference_max_abs_diff: float  # transformers at `precision` vs transformers in fp32 (0 for fp32)

    @property
    def passed(self) -> bool:
        if self.precision == "fp32":
            return self.max_abs_diff <= FP32_TOLERANCE
        return self.max_abs_diff <= LOW_PRECISION_FACTOR * self.reference_max_abs_diff

    def __str__(self) -> str:
        if self.precision == "fp32":
            return f"fp32: max |dlogits| = {self.max_abs_diff:.2e} (limit {FP32_TOLERANCE:g})"
        return (
            f"{self.precision}: max |dlogits| vs fp32 = {self.max_abs_diff:.2e}; transformers' own "
            f"{self.precision} error = {self.reference_max_abs_diff:.2e} (limit {LOW_PRECISION_FACTOR}x)"
        )


def probe_tokens(arch: Qwen3Arch, length: int = 32) -> torch.Tensor:
    """A fixed random prompt [1, length] for logits checks."""
    return torch.randint(0, arch.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def compare_with_transformers(
    arch: Qwen3Arch,
    hf_dir: str | Path,
    tokens: torch.Tensor,
    precision: str = "fp32",
    device: str = "cpu",
    model_chunks=None,
) -> ParityResult:
    """Load ``hf_dir`` into Megatron (unless ``model_chunks`` are given) and into transformers; compare logits."""
    dtype = PRECISIONS[precision]
    tokens = tokens.to(device)
    if model_chunks is None:
        model_chunks = build_gpt_model(arch, BuildOptions(precision=precision, aux_loss_coeff=0.0))
        load_hf_weights(model_chunks, hf_dir, arch)
    ours = forward_logits(model_chunks, tokens, vocab_size=arch.vocab_size).float()

    def transformers_logits(dtype):
        model = load_hf_model(hf_dir, dtype).to(device)
        logits = model(input_ids=tokens).logits.float()
        del model
        return logits

    reference = transformers_logits(torch.float32)
    reference_low = reference if dtype == torch.float32 else transformers_logits(dtype)
    return ParityResult(
        precision=precision,
        max_abs_diff=(ours - reference).abs().max().item(),
        reference_max_abs_diff=(reference_low - reference).abs().max().item(),
    )
