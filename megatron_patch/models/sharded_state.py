"""Move full Megatron tensors into and out of a live, possibly parallel, Megatron-Core model.

Megatron-Core's ``sharded_state_dict()`` already describes, for every local
parameter, which slice of which global checkpoint tensor it holds, for every
TP/PP/EP/ETP layout (QKV groups, [gate; up] halves, expert and layer offsets).
So loading is: for each local shard, compute the full tensor of its
``MegatronAddress`` and copy the shard's slice. No layout arithmetic lives
here or in any model file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from megatron_patch.models.weight_mapping import MegatronAddress

_PER_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT_KEY_PART = ".mlp.experts.experts."


def local_shards(model_chunks) -> Iterator[tuple[MegatronAddress, object]]:
    """(address, ShardedTensor) for every tensor this rank holds, factories expanded."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        # DDP and Float16Module wrappers delegate sharded_state_dict to the GPTModel.
        sharded = chunk.sharded_state_dict()
        apply_factories(sharded)
        for shard in nested_values(sharded):
            if isinstance(shard, ShardedTensor):
                yield address_of(shard), shard


def address_of(shard) -> MegatronAddress:
    """Global layer / expert index of a ShardedTensor, from its key and prepended axes."""
    key = shard.key
    layer = expert = None
    match = _PER_LAYER_KEY.match(key)
    if match:  # non-homogeneous layers get per-layer keys
        layer, key = int(match.group(1)), "decoder.layers." + match.group(2)
    axes = list(shard.global_offset[: shard.prepend_axis_num])
    if layer is None and key.startswith("decoder.layers.") and axes:
        layer = axes.pop(0)
    if _EXPERT_KEY_PART in key and axes:
        expert = axes.pop(0)
    if axes:
        raise ValueError(f"unexpected prepended axes {shard.global_offset[: shard.prepend_axis_num]} on {shard.key}")
    return MegatronAddress(key, layer, expert)


def local_slice(shard) -> tuple[slice, ...]:
    """Where a ShardedTensor's data sits in the full tensor of its address (prepended axes dropped)."""
    return tuple(
        slice(offset, offset + size)
        for offset, size in zip(shard.global_offset[shard.prepend_axis_num :], shard.local_shape)
    )


def shard_bytes(shard) -> int:
    return shard.data.numel() * shard.data.element_size()


def global_shape(shard) -> tuple[int, ...]:
    """The full tensor's shape of a ShardedTensor (prepended layer / expert axes dropped)."""
    return tuple(shard.global_shape[shard.prepend_axis_num :])


@torch.no_grad()
def load_full_tensors(model_chunks, full_tensor: Callable[[MegatronAddress], torch.Tensor], shards=None) -> int:
    """Copy into every local shard its slice of ``full_tensor(address)``; returns the shard count.

    ``shards``: (address, ShardedTensor) pairs to fill (default: every local shard). Raises
    ``ValueError`` naming the tensor if a shape does not fit.
    """
    cached: tuple[MegatronAddress | None, torch.Tensor | None] = (None, None)
    count = 0
    for address, shard in local_shards(model_chunks) if shards is None else shards:
        if cached[0] != address:
            cached = (address, full_tensor(address))
        full = cached[1]
        expected = global_shape(shard)
        if tuple(full.shape) != expected:
            raise ValueError(f"{address}: shape {tuple(full.shape)} does not fit the model's {expected}")
        shard.data.copy_(full[local_slice(shard)])
        count += 1
    return count


def main_replicas(model_chunks) -> list[tuple[MegatronAddress, object]]:
    """(address, ShardedTensor) of every main-replica shard this rank holds."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    return [(address, shard) for address, shard in local_shards(model_chunks) if is_main_replica(shard.replica_id)]


@torch.no_grad()
def host_piece(address: MegatronAddress, shard
               ) -> tuple[MegatronAddress, tuple[int, ...], tuple[slice, ...], torch.Tensor]:
    """(address, full shape, where, data) of a shard; the data a host copy of its own (a parameter is a view
    into DDP's buffer, which pickling would send whole)."""
    return address, global_shape(shard), local_slice(shard), shard.data.detach().to("cpu", copy=True)


def main_replica_pieces(model_chunks) -> list[tuple[MegatronAddress, tuple[int, ...], tuple[slice, ...], torch.Tensor]]:
    """``host_piece`` of every main-replica shard this rank holds."""
    return [host_piece(address, shard) for address, shard in main_replicas(model_chunks)]


def assemble_full_tensors(pieces) -> dict[MegatronAddress, torch.Tensor]:
    """Full tensors from (address, full shape, where, data) pieces; raises if one is only partly covered."""
    tensors: dict[MegatronAddress, torch.Tensor] = {}
    filled: dict[MegatronAddress, int] = {}
    for address, shape, where, data in pieces:
        tensors.setdefault(address, torch.empty(shape, dtype=data.dtype))[where] = data
        filled[address] = filled.get(address, 0) + data.numel()
    partial = [a for a, n in filled.items() if n != tensors[a].numel()]
    if partial:
        raise ValueError(f"{partial[0]} is only partly held by this rank; gather it from the checkpoint instead")
    return tensors


def read_full_tensors(model_chunks) -> dict[MegatronAddress, torch.Tensor]:
    """The full tensors of a model held entirely by this rank (a world of one, or replicas)."""
    return assemble_full_tensors(main_replica_pieces(model_chunks))
