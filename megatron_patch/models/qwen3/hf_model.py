"""transformers' own Qwen3 / Qwen3-MoE models as the numerical reference, built offline from a ``Qwen3Arch``."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from megatron_patch.models.qwen3.arch import Qwen3Arch

# Per-call progress bars of tiny checkpoints only clutter test and demo output.
transformers_logging.disable_progress_bar()


def hf_config(arch: Qwen3Arch):
    from transformers import AutoConfig

    config = arch.to_hf_config()
    model_type = config.pop("model_type")
    hf = AutoConfig.for_model(model_type, **config)
    # Eager attention is the plain reference computation on every device.
    hf._attn_implementation = "eager"
    return hf


def random_hf_model(arch: Qwen3Arch, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised transformers model of ``arch`` (no download)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=dtype)
    # Random init leaves norm weights at 1; perturb them so a swapped norm mapping shows up.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_random_hf_checkpoint(arch: Qwen3Arch, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Write a random HF checkpoint of ``arch`` (config.json + safetensors) to ``path``; returns the model."""
    model = random_hf_model(arch, seed, dtype)
    model.save_pretrained(str(path))
    return model


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' model from a local directory, eager attention, eval mode; never remote code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager", trust_remote_code=False, local_files_only=True
    )
    return model.eval()
