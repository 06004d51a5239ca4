"""The kit's choice tables, defined once: every flag, script check and builder reads them from here."""

from __future__ import annotations

import importlib.util

import torch

# Weight precisions: name -> dtype (converter outputs, model building, evaluation).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The names HF config.json uses for them.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Training also takes fp8: bf16 weights with Transformer-Engine's fp8 GEMMs.
TRAINING_PRECISIONS = (*PRECISIONS, "fp8")

# Activation recompute (Pai's AC): our name -> Megatron-Core's recompute_granularity.
# offload keeps activations (no recompute) and moves them to the CPU (Transformer-Engine).
RECOMPUTE_MODES = {"none": None, "sel": "selective", "full": "full", "offload": None}

# Which modules implement attention and the experts (``--transformer-impl``):
#   transformer_engine  Megatron-Core's TE spec (fused kernels; needs TE on CUDA)
#   torch               the local spec with our SDPA/varlen attention and grouped-GEMM experts
#   local               Megatron-Core's local spec unchanged (DotProductAttention, SequentialMLP)
# "auto" is transformer_engine when TE is importable on CUDA, else torch.
TRANSFORMER_IMPLS = ("auto", "transformer_engine", "torch", "local")
IMPL_MODULES = {
    "transformer_engine": "Transformer-Engine attention and grouped experts",
    "torch": "SdpaAttention: torch SDPA / varlen attention; GroupedGemmExperts: torch grouped_mm",
    "local": "Megatron-Core DotProductAttention and SequentialMLP",
}


def transformer_engine_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(requested: str = "auto") -> str:
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer implementation must be one of {TRANSFORMER_IMPLS}, got {requested!r}")
    if requested == "auto":
        return "transformer_engine" if transformer_engine_usable() else "torch"
    return requested
