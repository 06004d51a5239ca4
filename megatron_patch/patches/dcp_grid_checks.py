"""Linear-time chunk-overlap checks for torch_dist saves of Megatron-Core's regular chunk grids.

Saving a torch_dist checkpoint runs two overlap checks over every key's chunks:
``torch.distributed.checkpoint.default_planner._validate_global_plan`` and, when Megatron-Core
builds its torch ``ShardedTensor``s, ``torch.distributed._shard.sharding_spec._internals.
_find_nd_overlapping_shards``. Both are sweep lines along one dimension; for Megatron's expert
tensors ``[layers, experts, 2*ffn, hidden]`` every chunk spans that whole dimension, so they
degrade to pairwise comparisons: 12,288 chunks per key for Qwen3-30B-A3B, about 10^8
comparisons and minutes per conversion (measured: 16 layers 10 s, growing quadratically).

Megatron-Core's chunks are cells of a regular grid (it asserts ``has_regular_grid``). When,
along every dimension, the distinct chunk intervals are disjoint, two chunks overlap exactly
when they are the same cell: a linear check. Chunk sets that are not such a grid fall back to
torch's own code, so the result is the same as upstream's for every input.

Checked on torch 2.13.0. Used as a context manager around the converter's save only; delete when
torch's sweep lines handle full-span chunks.
"""

from __future__ import annotations

import contextlib
import logging
import math

logger = logging.getLogger(__name__)


def _grid_cells(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[tuple[int, ...]] | None:
    """Each box's cell (its offsets) if the boxes lie on a grid, else None."""
    if not boxes:
        return []
    for dim in range(len(boxes[0][0])):
        intervals = sorted({(offsets[dim], sizes[dim]) for offsets, sizes in boxes})
        for (start, size), (next_start, _) in zip(intervals, intervals[1:]):
            if start + size > next_start:
                return None  # intervals along this dimension overlap: not a grid
    return [tuple(offsets) for offsets, _ in boxes]


def _first_duplicate(cells: list[tuple[int, ...]]) -> tuple[int, int] | None:
    seen: dict[tuple[int, ...], int] = {}
    for index, cell in enumerate(cells):
        if cell in seen:
            return seen[cell], index
        seen[cell] = index
    return None


@contextlib.contextmanager
def grid_overlap_checks():
    """Within the block, torch's two chunk-overlap checks run in linear time on grid-shaped chunks."""
    from torch.distributed._shard.sharding_spec import _internals
    from torch.distributed.checkpoint import default_planner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    upstream_plan_check = getattr(default_planner, "_validate_global_plan", None)
    upstream_shard_check = getattr(_internals, "_find_nd_overlapping_shards", None)
    if upstream_plan_check is None or upstream_shard_check is None:
        raise RuntimeError("grid_overlap_checks: torch's chunk validation functions were not found")

    def find_overlapping_shards(shards, sharded_dims):
        cells = _grid_cells([(tuple(s.shard_offsets), tuple(s.shard_sizes)) for s in shards])
        if cells is None:
            return upstream_shard_check(shards, sharded_dims)
        return _first_duplicate(cells)

    def validate_global_plan(global_plan, metadata) -> list[str]:
        errors = []
        for key, value in metadata.state_dict_metadata.items():
            if isinstance(value, BytesStorageMetadata) or len(value.size) == 0:
                continue
            boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in value.chunks]
            cells = _grid_cells(boxes)
            if cells is None:
                return upstream_plan_check(global_plan, metadata)
            for offsets, sizes in boxes:
                if any(o < 0 or o + n > dim for o, n, dim in zip(offsets, sizes, value.size)):
                    errors.append(f"key:{key} has out of bounds chunk: tensor-size:{value.size} chunk: {offsets}")
            duplicate = _first_duplicate(cells)
            if duplicate is not None:
                errors.append(f"key:{key} has overlapping chunks at {cells[duplicate[0]]}")
            volume = sum(math.prod(sizes) for _, sizes in boxes)
            if len(global_plan) > 1 and volume != math.prod(value.size):
                errors.append(f"key:{key} invalid fill tensor-volume: {math.prod(value.size)} chunks-volume: {volume}")
        for error in errors:
            logger.warning(error)
        return errors

    default_planner._validate_global_plan = validate_global_plan
    _internals._find_nd_overlapping_shards = find_overlapping_shards
    try:
        yield
    finally:
        default_planner._validate_global_plan = upstream_plan_check
        _internals._find_nd_overlapping_shards = upstream_shard_check
