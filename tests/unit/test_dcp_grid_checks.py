"""The linear grid overlap checks agree with torch's own checks."""

import itertools

import pytest
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import _internals

from megatron_patch.patches.dcp_grid_checks import grid_overlap_checks


def grid(layers=3, experts=4, halves=2):
    """Megatron's expert layout: unit layer/expert axes, fc1 split in gate/up halves, full hidden."""
    return [
        ShardMetadata([layer, expert, half * 8, 0], [1, 1, 8, 16], "rank:0/cpu")
        for layer, expert, half in itertools.product(range(layers), range(experts), range(halves))
    ]


def overlap(shards):
    try:
        _internals.validate_non_overlapping_shards_metadata(shards)
        return False
    except ValueError:
        return True


@pytest.mark.parametrize(
    "shards, overlapping",
    [
        (grid(), False),
        (grid() + [grid()[5]], True),  # the same cell twice
        (grid()[:-1] + [ShardMetadata([2, 3, 4, 0], [1, 1, 8, 16], "rank:0/cpu")], True),  # off-grid, overlapping
        (grid()[:-1] + [ShardMetadata([2, 3, 9, 0], [1, 1, 7, 16], "rank:0/cpu")], False),  # off-grid, disjoint
    ],
    ids=["grid", "duplicate-cell", "off-grid-overlap", "off-grid-disjoint"],
)
def test_same_verdict_as_torch(shards, overlapping):
    upstream = overlap(shards)
    assert upstream == overlapping
    with grid_overlap_checks():
        assert overlap(shards) == upstream
    assert _internals._find_nd_overlapping_shards.__module__ == _internals.__name__  # restored


def test_global_plan_check_reports_the_same_problems(megatron_world, tmp_path):
    from torch.distributed.checkpoint import default_planner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    def metadata(boxes, size=(3, 4, 16, 16)):
        chunks = [ChunkStorageMetadata(offsets=o, sizes=s) for o, s in boxes]
        return Metadata({"w": TensorStorageMetadata(TensorProperties(), size, chunks)})

    cells = [((s.shard_offsets), (s.shard_sizes)) for s in grid()]
    # complete grid: fine; a cell twice: overlap; a cell missing: incomplete fill.
    for boxes, has_errors in ((cells, False), (cells + [cells[0]], True), (cells[:-1], True)):
        assert bool(default_planner._validate_global_plan([None, None], metadata(boxes))) == has_errors
        with grid_overlap_checks():
            assert bool(default_planner._validate_global_plan([None, None], metadata(boxes))) == has_errors
