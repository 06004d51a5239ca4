"""What a Megatron checkpoint of an architecture contains, without allocating it.

The model is built on the ``meta`` device at TP=PP=EP=1 and asked for its
``sharded_state_dict()``: every key, global shape, layer/expert offset and
``_extra_state`` object a real model saves, exactly as Megatron-Core lays them
out. torch_dist keys are layout-independent, so this one template describes
the checkpoint for every TP/PP/EP/ETP that will later load it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_patch.models.choices import PRECISIONS
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.qwen3.loading import check_hf_shapes, hf_tensor_shapes
from megatron_patch.models.sharded_state import address_of, global_shape, shard_bytes
from megatron_patch.models.weight_mapping import MegatronAddress


@dataclass
class CheckpointTemplate:
    tensors: list  # ShardedTensor, factories applied, data on the meta device
    objects: list  # ShardedObject (_extra_state)

    def addresses(self) -> list[MegatronAddress]:
        seen: dict[MegatronAddress, None] = {}
        for shard in self.tensors:
            seen.setdefault(address_of(shard), None)
        return list(seen)


def checkpoint_template(arch: Qwen3Arch, precision: str) -> CheckpointTemplate:
    """Needs Megatron's process groups at TP=PP=EP=1 (``initialize_parallel(ParallelLayout())``)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    with torch.device("meta"):
        model = build_gpt_model(
            arch, BuildOptions(precision=precision, cpu_initialization=True), perform_initialization=False
        )
    # The local spec keeps norm weights in fp32; Megatron-LM's Float16Module (and TE) store
    # every weight in the training dtype, and so does the checkpoint.
    model.to(PRECISIONS[precision])
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    tensors, objects = [], []
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            tensors.append(item)
        elif isinstance(item, ShardedObject):
            objects.append(item)
    return CheckpointTemplate(tensors, objects)


def balance_by_bytes(template: CheckpointTemplate, world_size: int) -> list[set[MegatronAddress]]:
    """Split the addresses over ranks, largest first onto the least loaded rank (same result on every rank)."""
    sizes: dict[MegatronAddress, int] = {}
    for shard in template.tensors:
        address = address_of(shard)
        sizes[address] = sizes.get(address, 0) + shard_bytes(shard)
    loads = [0] * world_size
    assignment: list[set[MegatronAddress]] = [set() for _ in range(world_size)]
    for address in sorted(sizes, key=lambda a: (-sizes[a], a)):
        rank = loads.index(min(loads))
        assignment[rank].add(address)
        loads[rank] += sizes[address]
    return assignment


def plan_hf_tensors(
    arch: Qwen3Arch, precision: str, template: CheckpointTemplate | None = None
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Name, shape and dtype of every HF tensor, in mapping order."""
    dtype = PRECISIONS[precision]
    template = template or checkpoint_template(arch, precision)
    shapes = hf_tensor_shapes(arch, {address_of(s): global_shape(s) for s in template.tensors})
    return [(name, shape, dtype) for name, shape in shapes.items()]


def check_hf_fits(checkpoint, arch: Qwen3Arch, precision: str, template: CheckpointTemplate) -> None:
    """Every tensor of an HF checkpoint (``models.hf_checkpoint.HFCheckpoint``) has the shape the
    template's model needs; the error names the file and the tensor."""
    check_hf_shapes(checkpoint, {name: shape for name, shape, _ in plan_hf_tensors(arch, precision, template)})
