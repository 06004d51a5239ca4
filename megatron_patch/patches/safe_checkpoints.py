"""Patch: torch DCP loads checkpoints without running code from them (torch 2.13, every version so far).

Upstream, ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain ``pickle.load``
and ``DefaultLoadPlanner.load_bytes`` reads every non-tensor item with
``torch.load(weights_only=False)``; Megatron-Core's ``dist_checkpointing.load`` (0.16.1) goes
through both (``CachedMetadataFileSystemReader`` and ``MCoreLoadPlanner`` inherit them). So a
planted ``.metadata`` runs its code in the converter, in training ``--load`` and in
evaluation. ``patch_safe_checkpoint_loading`` swaps both for the allowlisted readers below.
It can go when torch DCP reads metadata and bytes with ``weights_only`` semantics itself.

Allowed in ``.metadata``: torch DCP's metadata and planner classes, ``torch.Size``, dtypes,
memory formats and layouts, ``pathlib`` paths and plain containers: what every checkpoint the
kit writes holds (converter output and training saves at every layout). Non-tensor items go
through torch's own ``weights_only`` unpickler with NumPy arrays added (the NumPy RNG state).
Anything else stops the load with one line naming the file and the class.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from megatron_patch.errors import InputError

_DCP = "torch.distributed.checkpoint"
# (module, name) pairs a legitimate .metadata holds; "*" admits a module's classes.
_METADATA_GLOBALS = {
    (f"{_DCP}.metadata", "*"),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    (f"{_DCP}.planner", "SavePlan"),
    (f"{_DCP}.planner", "WriteItem"),
    (f"{_DCP}.planner", "WriteItemType"),
    (f"{_DCP}.planner", "TensorWriteData"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}
# NumPy arrays are rebuilt from their bytes and dtype; nothing of the file's choosing runs.
_NUMPY_GLOBALS = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# How a refusal reads ("FILE: refused to load CLASS (...)"), to find it in a collective error report.
REFUSED_PATTERN = r"[^\s\"'{}]+(?: \(item \S+\))?: refused to load [\w.]+ \([^)]*\)"


class UnsafeCheckpointError(InputError):
    """A checkpoint file that would build objects (and so may run code) a checkpoint never holds."""


def _is_allowed(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS or (module, "*") in _METADATA_GLOBALS:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream, source: str):
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str):
        if not _is_allowed(module, name):
            raise UnsafeCheckpointError(f"{self.source}: refused to load {module}.{name} (a checkpoint's .metadata "
                                        "holds only torch DCP's own classes; this one may run code)")
        return super().find_class(module, name)


def read_dcp_metadata(path: str | Path):
    """The ``.metadata`` of a torch_dist directory (or that file itself), read with the allowlist."""
    path = Path(path)
    file = path / ".metadata" if path.is_dir() else path
    with open(file, "rb") as stream:
        try:
            return _MetadataUnpickler(stream, str(file)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # truncated, or not a pickle at all
            raise UnsafeCheckpointError(f"{file}: not a readable torch_dist .metadata "
                                        f"({type(err).__name__}: {err})") from err


def load_checkpoint_item(stream: io.BytesIO, source: Callable[[], str]):
    """A non-tensor checkpoint item (RNG state, optimizer groups, ``_extra_state``), read with the allowlist.

    ``source()`` names the item in a refusal (built only then: loads read many items).
    """
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(stream, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        culprit = text.split("GLOBAL ", 1)[1].split()[0] if "GLOBAL " in text else "an object"
        raise UnsafeCheckpointError(f"{source()}: refused to load {culprit} (checkpoint items hold tensors, NumPy "
                                    "arrays and plain values; this one may run code)") from None


def patch_safe_checkpoint_loading() -> bool:
    """Idempotent; False when torch's DCP classes are not where this patch expects them."""
    from torch.distributed.checkpoint import default_planner, filesystem
    from torch.distributed.checkpoint.metadata import StorageMeta

    reader, planner = filesystem.FileSystemReader, default_planner.DefaultLoadPlanner
    if not (hasattr(reader, "read_metadata") and hasattr(reader, "_get_metadata_path")
            and hasattr(planner, "load_bytes")):
        return False
    if getattr(reader.read_metadata, "_megatron_patch", False):
        return True

    def read_metadata(self, *args, **kwargs):
        metadata = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        metadata._megatron_patch_dir = str(self.path)  # for load_bytes' messages; not a dataclass field
        return metadata

    def describe(metadata, read_item) -> str:
        directory = getattr(metadata, "_megatron_patch_dir", "torch_dist checkpoint")
        stored = metadata.storage_data.get(read_item.storage_index) if metadata is not None else None
        file = f"{directory}/{stored.relative_path}" if stored is not None else directory
        return f"{file} (item {read_item.dest_index.fqn})"

    def load_bytes(self, read_item, value):
        loaded = load_checkpoint_item(value, lambda: describe(self.metadata, read_item))
        if self.flatten_state_dict:
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

    read_metadata._megatron_patch = True
    reader.read_metadata = read_metadata
    planner.load_bytes = load_bytes
    return True
