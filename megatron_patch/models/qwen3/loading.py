"""HF Qwen3 checkpoints as full Megatron tensors: into live model chunks (any layout) or to the converter."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from megatron_patch.models.hf_checkpoint import HFCheckpoint
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.mapping import bound_qwen3_mappings
from megatron_patch.models.sharded_state import global_shape, load_full_tensors, local_shards
from megatron_patch.models.weight_mapping import MappingError, MegatronAddress, check_hf_names

# Tied checkpoints sometimes carry a redundant copy of the embedding as lm_head.
_REDUNDANT_WHEN_TIED = "lm_head.weight"


def hf_weight_source(
    hf_dir: str | Path, arch: Qwen3Arch, check_finite: bool = False
) -> tuple[HFCheckpoint, Callable[[MegatronAddress], torch.Tensor]]:
    """The checkpoint, name- and dtype-checked against ``arch``, and the full Megatron tensor of any address.

    Every weight must be stored as floating point: an integer or bool tensor (a damaged or hand-edited
    header) would otherwise be cast to float without a word. ``check_finite``: a tensor holding NaN or Inf
    is refused as it is read, naming it (training would fail later in the gradient norm, naming nothing).
    """
    checkpoint = HFCheckpoint(hf_dir)
    bound = bound_qwen3_mappings(arch)
    names = [n for n in checkpoint.keys() if not (arch.tie_word_embeddings and n == _REDUNDANT_WHEN_TIED)]
    check_hf_names(bound, names, source=str(hf_dir))
    for name in names:
        if not checkpoint.dtype(name).is_floating_point:
            raise MappingError(f"{checkpoint.file_of(name)}: tensor {name} is stored as {checkpoint.dtype(name)}; "
                               "model weights are floating point (a damaged or hand-edited file?)")
    by_address = {b.address: b for b in bound}

    def read(name: str) -> torch.Tensor:
        tensor = checkpoint.get(name)
        if check_finite:
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise MappingError(f"{checkpoint.file_of(name)}: tensor {name} holds {bad} NaN or Inf values of "
                                   f"{tensor.numel()}")
        return tensor

    def full_tensor(address: MegatronAddress) -> torch.Tensor:
        if address not in by_address:
            raise MappingError(f"the model has {address}, which the Qwen3 mapping does not produce")
        return by_address[address].to_megatron(read)

    return checkpoint, full_tensor


def hf_tensor_shapes(
    arch: Qwen3Arch, megatron_shapes: Mapping[MegatronAddress, tuple[int, ...]],
    addresses: Iterable[MegatronAddress] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor the mapping makes ``addresses`` (default: all of ``arch``) from, in
    mapping order, given the full Megatron shapes (shapes through the transforms, on meta tensors)."""
    wanted = None if addresses is None else set(addresses)
    shapes: dict[str, tuple[int, ...]] = {}
    for b in bound_qwen3_mappings(arch):
        if wanted is not None and b.address not in wanted:
            continue
        if b.address not in megatron_shapes:
            raise MappingError(f"the Qwen3 mapping produces {b.address}, which the model does not have")
        meta = torch.empty(megatron_shapes[b.address], device="meta")
        shapes.update((name, tuple(t.shape)) for name, t in b.to_hf(meta).items())
    return shapes


def check_hf_shapes(checkpoint: HFCheckpoint, shapes: Mapping[str, tuple[int, ...]], needs: str = "the config") -> None:
    """Every named tensor of ``checkpoint`` has the expected shape; the error names the file and tensor."""
    for name, shape in shapes.items():
        if checkpoint.shape(name) != shape:
            raise MappingError(f"{checkpoint.file_of(name)}: tensor {name} has shape {checkpoint.shape(name)}, "
                               f"{needs} needs {shape}")


def load_hf_weights(model_chunks, hf_dir: str | Path, arch: Qwen3Arch | None = None,
                    keep: Callable[[str], bool] | None = None) -> int:
    """Fill ``model_chunks`` (any layout) from the safetensors in ``hf_dir``; returns the number of local shards.

    Each rank reads only the HF tensors behind the shards it holds (its pipeline stage, its experts),
    one full tensor at a time, whatever the depth of the model. ``keep(checkpoint_key)`` fills only
    part of the model (LoRA: the base weights, not the adapters). The shapes are checked, naming the
    file and tensor, before anything is read.
    """
    arch = arch or Qwen3Arch.from_hf_dir(hf_dir)
    checkpoint, full_tensor = hf_weight_source(hf_dir, arch, check_finite=True)
    shards = [(a, s) for a, s in local_shards(model_chunks) if keep is None or keep(s.key)]
    shapes = {address: global_shape(shard) for address, shard in shards}
    check_hf_shapes(checkpoint, hf_tensor_shapes(arch, shapes, addresses=shapes), needs="the model")
    return load_full_tensors(model_chunks, full_tensor, shards)
