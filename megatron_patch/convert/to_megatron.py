"""HF safetensors -> Megatron-Core torch_dist, streamed: one checkpoint chunk in memory at a time.

Megatron-Core's own code does the format work (``save_preprocess``, key
translation to torch DCP, the common state and ``metadata.json``); the only
thing replaced is where chunk data comes from: a DCP planner whose
``resolve_data`` computes each chunk from the HF tensors through the weight
mapping when the writer asks for it. Memory stays at a few tensors however
many layers the model has. With several processes, each writes the chunks
``balance_by_bytes`` assigns to it into its own ``__<rank>_0.distcp``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_patch.convert.template import balance_by_bytes, check_hf_fits, checkpoint_template
from megatron_patch.models.choices import PRECISIONS
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.loading import hf_weight_source
from megatron_patch.models.sharded_state import address_of, local_slice, shard_bytes
from megatron_patch.models.weight_mapping import MegatronAddress
from megatron_patch.patches.compat import add_common_state
from megatron_patch.patches.dcp_grid_checks import grid_overlap_checks

CHECKPOINT_VERSION = 3.0


class _FullTensorCache:
    """The last few full Megatron tensors: the gate and up halves of fc1 are two chunks of one tensor."""

    def __init__(self, compute: Callable[[MegatronAddress], torch.Tensor], size: int = 4):
        self.compute, self.size = compute, size
        self.items: OrderedDict[MegatronAddress, torch.Tensor] = OrderedDict()

    def __call__(self, address: MegatronAddress) -> torch.Tensor:
        if address in self.items:
            self.items.move_to_end(address)
        else:
            self.items[address] = self.compute(address)
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        return self.items[address]


def _lazy_planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyChunkPlanner(MCoreSavePlanner):
        """Megatron's save planner, with tensor data produced on demand by ``resolve_chunk``."""

        def __init__(self, resolve_chunk, on_chunk=None):
            super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
            self.resolve_chunk, self.on_chunk = resolve_chunk, on_chunk

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            tensor = self.resolve_chunk(write_item.index.fqn, tuple(write_item.index.offset))
            if self.on_chunk is not None:
                self.on_chunk(tensor)
            return tensor

    return LazyChunkPlanner


def write_torch_dist(
    arch: Qwen3Arch,
    hf_dir: str | Path,
    checkpoint_dir: str | Path,
    precision: str,
    common_extra: dict | None = None,
    progress=None,
    finite=None,
) -> None:
    """Write the torch_dist checkpoint of ``hf_dir`` into the existing empty ``checkpoint_dir``.

    Every rank of the default process group takes part; ``progress`` (``start(bytes)``,
    ``update(tensor)``) follows this rank's share; ``finite(name, tensor)`` sees every chunk
    written. Raises ``MappingError`` / ``ValueError`` naming the tensor for a checkpoint that does
    not fit ``arch``.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    checkpoint, full_tensor = hf_weight_source(hf_dir, arch)
    dtype = PRECISIONS[precision]

    template = checkpoint_template(arch, precision)
    check_hf_fits(checkpoint, arch, precision, template)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = balance_by_bytes(template, world)[rank]
    if progress is not None:
        progress.start(sum(shard_bytes(s) for s in template.tensors if address_of(s) in mine))

    cached = _FullTensorCache(full_tensor)
    chunks: dict[tuple[str, tuple[int, ...]], tuple[MegatronAddress, tuple]] = {}
    my_tensors = []
    for shard in template.tensors:
        address = address_of(shard)
        if address not in mine:
            continue
        # This rank writes the chunk, whatever replica Megatron would have named.
        shard.replica_id = 0
        my_tensors.append(shard)
        chunks[(shard.key, tuple(shard.global_offset))] = (address, local_slice(shard))
    my_objects = []
    for obj in template.objects if rank == 0 else []:
        obj.replica_id = 0
        my_objects.append(obj)

    def resolve_chunk(fqn: str, offset: tuple[int, ...]) -> torch.Tensor:
        address, slices = chunks[(fqn, offset)]
        chunk = cached(address)[slices].to(dtype).contiguous()
        if finite is not None:
            finite(f"{hf_dir}: {address}", chunk)
        return chunk.view((1,) * (len(offset) - len(slices)) + tuple(chunk.shape))

    state = {
        "model": {f"t{i}": s for i, s in enumerate(my_tensors)} | {f"o{i}": o for i, o in enumerate(my_objects)},
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
        "megatron_patch": dict(common_extra or {}),
    }
    with grid_overlap_checks():
        sharded_part, common = save_preprocess(state, validate_access_integrity=True)
        sharded_part = add_common_state(sharded_part, common, checkpoint_dir)
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_part, keep_only_main_replica=True)
        dcp.save(
            mcore_to_pyt_state_dict(flat, is_loading=False),
            storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1),
            planner=_lazy_planner_class()(resolve_chunk, progress.update if progress is not None else None),
        )
    dist.barrier()
    if rank == 0:
        save_config(CheckpointingConfig("torch_dist", 1), str(checkpoint_dir))
