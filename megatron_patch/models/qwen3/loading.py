"""HF Qwen3 checkpoints as full Megatron tensors: into live model chunks (any layout) or to the converter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from megatron_patch.models.hf_checkpoint import HFCheckpoint
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.mapping import bound_qwen3_mappings
from megatron_patch.models.sharded_state import load_full_tensors
from megatron_patch.models.weight_mapping import MappingError, MegatronAddress, check_hf_names

# Tied checkpoints sometimes carry a redundant copy of the embedding as lm_head.
_REDUNDANT_WHEN_TIED = "lm_head.weight"


def hf_weight_source(
    hf_dir: str | Path, arch: Qwen3Arch
) -> tuple[HFCheckpoint, Callable[[MegatronAddress], torch.Tensor]]:
    """The checkpoint, name-checked against ``arch``, and the full Megatron tensor of any address."""
    checkpoint = HFCheckpoint(hf_dir)
    bound = bound_qwen3_mappings(arch)
    names = [n for n in checkpoint.keys() if not (arch.tie_word_embeddings and n == _REDUNDANT_WHEN_TIED)]
    check_hf_names(bound, names, source=str(hf_dir))
    by_address = {b.address: b for b in bound}

    def full_tensor(address: MegatronAddress) -> torch.Tensor:
        if address not in by_address:
            raise MappingError(f"the model has {address}, which the Qwen3 mapping does not produce")
        return by_address[address].to_megatron(checkpoint.get)

    return checkpoint, full_tensor


def load_hf_weights(model_chunks, hf_dir: str | Path, arch: Qwen3Arch | None = None) -> int:
    """Fill ``model_chunks`` from the safetensors in ``hf_dir``; returns the number of local shards."""
    arch = arch or Qwen3Arch.from_hf_dir(hf_dir)
    _, full_tensor = hf_weight_source(hf_dir, arch)
    return load_full_tensors(model_chunks, full_tensor)
