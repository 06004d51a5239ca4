"""Megatron-Core API differences between the versions the kit is checked on (0.16.1 and 0.19.2).

Every call whose shape moved between those releases goes through here, so the rest of the kit
reads one API. Each helper detects the feature, not the version number, and says which release
changed it. (The other modules of ``patches/`` change upstream *behaviour*; this one only adapts
how the kit *calls* Megatron-Core.)

- Layer specs (0.19): the MLP and MoE experts of ``get_gpt_decoder_block_spec`` became
  ``functools.partial(Module, submodules=...)`` builders instead of ``ModuleSpec``;
  ``spec_module`` / ``spec_submodules`` / ``replace_spec`` read and rewrite both.
- Common state of a torch_dist save (0.19): the non-tensor entries moved from ``common.pt``
  (``get_default_save_common_strategy``, gone in 0.19) into a ``ShardedObject`` named
  ``common_state`` inside the DCP files. ``add_common_state`` writes whichever the installed
  version writes itself; 0.19 still reads the old ``common.pt``, 0.16.1 cannot read the new.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from megatron_patch.patches.safe_checkpoints import read_dcp_metadata

COMMON_STATE_KEY = "common_state"  # megatron-core >= 0.19: the ShardedObject holding the common entries


def spec_module(spec):
    """The module class a spec builds: ``ModuleSpec.module``, or a builder partial's function (0.19)."""
    if isinstance(spec, functools.partial):
        return spec.func
    return getattr(spec, "module", spec)


def spec_submodules(spec):
    """The submodules dataclass of a ``ModuleSpec`` or of a ``partial(Module, submodules=...)`` builder."""
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def replace_spec(spec, *, module=None, submodules=None):
    """``spec`` with its module class and/or submodules replaced, in the same form (ModuleSpec or partial)."""
    if isinstance(spec, functools.partial):
        keywords = dict(spec.keywords)
        if submodules is not None:
            keywords["submodules"] = submodules
        return functools.partial(module or spec.func, *spec.args, **keywords)
    changes = {}
    if module is not None:
        changes["module"] = module
    if submodules is not None:
        changes["submodules"] = submodules
    return dataclasses.replace(spec, **changes)


def common_state_in_dcp() -> bool:
    """Whether this Megatron-Core stores a save's common entries inside the DCP files (0.19+)."""
    from megatron.core.dist_checkpointing import serialization

    return not hasattr(serialization, "get_default_save_common_strategy")


def common_state_files(checkpoint_dir: str | Path) -> tuple[str, ...]:
    """The files (relative names) that reading a torch_dist directory's common state opens.

    ``common.pt`` where it exists (0.16.1's saves; 0.19 reads it first); otherwise ``.metadata``
    and the DCP file holding the ``common_state`` item.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / "common.pt").is_file() or not (checkpoint_dir / ".metadata").is_file():
        return ("common.pt",)
    metadata = read_dcp_metadata(checkpoint_dir)
    holders = {info.relative_path for index, info in metadata.storage_data.items()
               if index.fqn.split("/", 1)[0] == COMMON_STATE_KEY}
    return (".metadata", *sorted(holders))


def add_common_state(sharded_state: dict, common: dict, checkpoint_dir: str | Path) -> dict:
    """Store ``common`` (``save_preprocess``'s common part) the way the installed version's ``save`` does.

    0.16.1: rank 0 writes ``common.pt`` now and ``sharded_state`` is returned as is. 0.19+: the
    entries become the ``common_state`` ShardedObject of ``sharded_state`` (rank 0's copy is the
    one written), saved with the tensors.
    """
    import torch.distributed as dist

    if not common_state_in_dcp():
        from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy

        get_default_save_common_strategy().save_common(common, str(checkpoint_dir))
        return sharded_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank = dist.get_rank() if dist.is_initialized() else 0
    return {**sharded_state, COMMON_STATE_KEY: ShardedObject(COMMON_STATE_KEY, common, (1,), (0,), replica_id=rank)}
