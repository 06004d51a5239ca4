"""Megatron-Core torch_dist -> HF safetensors, one Megatron tensor in memory at a time.

The template says which regions of which checkpoint keys make up each
Megatron tensor; ``TorchDistCheckpoint`` reads those regions whatever layout
wrote the checkpoint (optimizer state and anything else is never read). Each
tensor is turned into HF tensors by the weight mapping and written at its
planned offset in the safetensors shards. Ranks split the tensors by bytes and
work independently. The source may also be an HF directory (the base of a LoRA
run trained straight from HF), whose tensors come through the same mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patch.checkpoints import CheckpointError, TorchDistCheckpoint, is_hf_model_dir
from megatron_patch.convert.template import balance_by_bytes, check_hf_fits, checkpoint_template, plan_hf_tensors
from megatron_patch.models.choices import PRECISIONS
from megatron_patch.models.hf_checkpoint import StreamingSafetensorsWriter
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.loading import hf_weight_source
from megatron_patch.models.qwen3.mapping import bound_qwen3_mappings
from megatron_patch.models.sharded_state import address_of, global_shape, local_slice, shard_bytes
from megatron_patch.models.weight_mapping import MegatronAddress


def _stored_region(checkpoint: TorchDistCheckpoint, shard) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(key, offsets, sizes) of a template shard in the checkpoint (stacked or per-layer keys)."""
    sizes = (1,) * shard.prepend_axis_num + tuple(shard.local_shape)
    key, offsets = checkpoint.locate(shard.key, tuple(shard.global_offset))
    return key, offsets, sizes[len(sizes) - len(offsets):]


def check_contents(checkpoint: TorchDistCheckpoint, template) -> None:
    """Every tensor the config needs is in the checkpoint with the config's global shape."""
    for shard in template.tensors:
        key, offsets, sizes = _stored_region(checkpoint, shard)
        stored = checkpoint.global_shape(key)
        if stored is None:
            raise CheckpointError(f"{checkpoint.path}: tensor {key} is missing (checkpoint of another model?)")
        needed = tuple(shard.global_shape[len(shard.global_shape) - len(stored):])
        if stored != needed:
            raise CheckpointError(
                f"{checkpoint.path}: tensor {key} has shape {stored} in the checkpoint, the config needs {needed}"
            )


def _torch_dist_source(checkpoint_dir: Path, template) -> Callable[[list, torch.dtype], torch.Tensor]:
    """The full tensor of a group of template shards (one address), read from their stored regions."""
    checkpoint = TorchDistCheckpoint(checkpoint_dir)
    check_contents(checkpoint, template)

    def read(shards: list, dtype: torch.dtype) -> torch.Tensor:
        full = torch.empty(global_shape(shards[0]), dtype=dtype)
        for shard in shards:
            key, offsets, sizes = _stored_region(checkpoint, shard)
            checkpoint.read(key, offsets, sizes, full.dtype, out=full[local_slice(shard)])
        return full

    return read


def _hf_source(hf_dir: Path, arch: Qwen3Arch, precision: str, template) -> Callable[[list, torch.dtype], torch.Tensor]:
    checkpoint, full_tensor = hf_weight_source(hf_dir, arch)
    check_hf_fits(checkpoint, arch, precision, template)
    return lambda shards, dtype: full_tensor(address_of(shards[0])).to(dtype)


def write_hf_safetensors(
    arch: Qwen3Arch,
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    precision: str,
    max_shard_bytes: int,
    progress=None,
    delta: Callable[[MegatronAddress], torch.Tensor | None] | None = None,
    finite=None,
    template=None,
) -> list[str]:
    """Write the HF safetensors of a torch_dist checkpoint (or an HF directory); every rank of the
    default group takes part.

    ``delta(address)``, when given, is added to that Megatron tensor in fp32 before it is
    written (LoRA merge: scale * B @ A); None leaves the tensor as stored. ``finite(name, tensor)``
    sees every HF tensor before it is written. ``template``: ``checkpoint_template(arch, precision)``
    made earlier (it needs the canonical process groups, which a training job no longer has).
    """
    dtype = PRECISIONS[precision]
    template = template or checkpoint_template(arch, precision)
    checkpoint_dir = Path(checkpoint_dir)
    read_full = _hf_source(checkpoint_dir, arch, precision, template) if is_hf_model_dir(checkpoint_dir) \
        else _torch_dist_source(checkpoint_dir, template)
    bound = {b.address: b for b in bound_qwen3_mappings(arch)}
    unmapped = [a for a in template.addresses() if a not in bound]
    if unmapped:
        raise CheckpointError(f"the model has {unmapped[0]}, which the Qwen3 mapping does not produce")

    writer = StreamingSafetensorsWriter(output_dir, plan_hf_tensors(arch, precision, template), max_shard_bytes)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        writer.create_files()
    dist.barrier()
    mine = balance_by_bytes(template, world)[rank]
    shards_of: dict = {}
    for shard in template.tensors:
        if address_of(shard) in mine:
            shards_of.setdefault(address_of(shard), []).append(shard)
    if progress is not None:
        progress.start(sum(shard_bytes(s) for group in shards_of.values() for s in group))
    for address, shards in shards_of.items():
        change = delta(address) if delta is not None else None
        full = read_full(shards, dtype if change is None else torch.float32)
        if change is not None:
            if change.shape != full.shape:
                raise CheckpointError(f"{address}: the change {tuple(change.shape)} does not fit the "
                                             f"weight {tuple(full.shape)}")
            full = (full + change).to(dtype)
        for name, hf_tensor in bound[address].to_hf(full).items():
            if finite is not None:
                finite(name, hf_tensor)
            writer.write(name, hf_tensor)
            if progress is not None:
                progress.update(hf_tensor)
    writer.sync()
    dist.barrier()
    if rank == 0:
        writer.write_index()
    return writer.files
