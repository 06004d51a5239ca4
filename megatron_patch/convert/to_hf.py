"""Megatron-Core torch_dist -> HF safetensors, in groups of tensors of bounded size.

Each group of Megatron tensors is read with Megatron-Core's own
``dist_checkpointing.load`` on a template that holds only that group, so only
those chunks are read (optimizer state and other layers are left on disk),
whatever layout wrote the checkpoint. The group is turned into HF tensors by
the weight mapping and written at its planned place in the safetensors shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from megatron_patch.convert.template import checkpoint_template, plan_hf_tensors
from megatron_patch.models.hf_checkpoint import StreamingSafetensorsWriter
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import PRECISIONS
from megatron_patch.models.qwen3.mapping import bound_qwen3_mappings
from megatron_patch.models.sharded_state import address_of
from megatron_patch.models.weight_mapping import MegatronAddress

GROUP_BYTES = 512 << 20


class CheckpointContentError(ValueError):
    """A torch_dist checkpoint that does not hold the tensors the config describes."""


def group_addresses(template, max_bytes: int = GROUP_BYTES) -> list[list[MegatronAddress]]:
    """Consecutive addresses (layer-major) in groups of at most ``max_bytes`` (a bigger tensor is a group alone)."""
    sizes: dict[MegatronAddress, int] = {}
    for shard in template.tensors:
        address = address_of(shard)
        sizes[address] = sizes.get(address, 0) + shard.data.numel() * shard.data.element_size()
    groups, current, current_bytes = [], [], 0
    for address, size in sizes.items():
        if current and current_bytes + size > max_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(address)
        current_bytes += size
    if current:
        groups.append(current)
    return groups


def read_groups(
    checkpoint_dir: str | Path, template, groups: list[list[MegatronAddress]], dtype: torch.dtype
) -> Iterator[dict[MegatronAddress, torch.Tensor]]:
    """Full Megatron tensors of each group, read from the torch_dist checkpoint.

    Loading is collective (torch DCP plans across the default group): every rank
    must pass the same number of groups; an empty group is a valid no-op load.
    """
    from megatron.core import dist_checkpointing

    shards_of: dict[MegatronAddress, list] = {}
    for shard in template.tensors:
        shards_of.setdefault(address_of(shard), []).append(shard)
    for group in groups:
        full, request = {}, {}
        for address in group:
            first = shards_of[address][0]
            full[address] = torch.empty(first.global_shape[first.prepend_axis_num :], dtype=dtype)
            for shard in shards_of[address]:
                slices = tuple(
                    slice(o, o + n) for o, n in zip(shard.global_offset[shard.prepend_axis_num :], shard.local_shape)
                )
                shard.data = full[address][slices]  # loading fills the full tensor through this view
                request[f"s{len(request)}"] = shard
        try:
            # Megatron's "unexpected": requested here but absent from the checkpoint.
            _, _, absent = dist_checkpointing.load(
                sharded_state_dict={"model": request},
                checkpoint_dir=str(checkpoint_dir),
                validate_access_integrity=False,
                strict="return_unexpected",
            )
        except Exception as err:  # Megatron raises several types for a shape mismatch
            raise CheckpointContentError(f"{checkpoint_dir}: cannot read {group[0].key}: {err}") from None
        if absent:
            name = sorted(absent)[0]
            raise CheckpointContentError(f"{checkpoint_dir}: tensor {name} is missing (checkpoint of another model?)")
        if group:
            yield full
        for address in group:
            for shard in shards_of[address]:
                shard.data = None


def write_hf_safetensors(
    arch: Qwen3Arch,
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    precision: str,
    max_shard_bytes: int,
    progress=None,
) -> list[str]:
    """Write the HF safetensors of a torch_dist checkpoint; every rank of the default group takes part."""
    import torch.distributed as dist

    dtype = PRECISIONS[precision]
    template = checkpoint_template(arch, precision)
    bound = {b.address: b for b in bound_qwen3_mappings(arch)}
    unmapped = [a for a in template.addresses() if a not in bound]
    if unmapped:
        raise CheckpointContentError(f"the model has {unmapped[0]}, which the Qwen3 mapping does not produce")
    writer = StreamingSafetensorsWriter(output_dir, plan_hf_tensors(arch, precision), max_shard_bytes)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        writer.create_files()
    dist.barrier()
    every_group = group_addresses(template)
    rounds = -(-len(every_group) // world)
    # Same number of (collective) loads on every rank; the last round may be empty for some.
    groups = [every_group[i] if i < len(every_group) else [] for i in range(rank, rounds * world, world)]
    if progress is not None:
        mine = {a for g in groups for a in g}
        progress.start(sum(s.data.numel() * s.data.element_size() for s in template.tensors if address_of(s) in mine))
    for tensors in read_groups(checkpoint_dir, template, groups, dtype):
        for address, full in tensors.items():
            for name, hf_tensor in bound[address].to_hf(full).items():
                writer.write(name, hf_tensor.to(dtype))
                if progress is not None:
                    progress.update(hf_tensor)
    dist.barrier()
    if rank == 0:
        writer.write_index()
    return writer.files
