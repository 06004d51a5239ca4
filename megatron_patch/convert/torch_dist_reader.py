"""Read any region of any tensor of a torch_dist checkpoint, without process groups.

A torch_dist checkpoint is a torch DCP checkpoint: ``.metadata`` lists, per
key, the chunks each writing rank stored and where (file, offset, length);
each chunk is a ``torch.save``'d tensor. Whatever layout wrote the checkpoint
(TP halves, EP ranges, layers spread over PP stages), a region is assembled
from the chunks that overlap it. Chunks are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch


class CheckpointContentError(ValueError):
    """A torch_dist checkpoint that does not hold the tensors the config describes."""


class TorchDistCheckpoint:
    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise CheckpointContentError(f"{self.path}: no .metadata (not a torch_dist checkpoint)")
        self.metadata = FileSystemReader(str(self.path)).read_metadata()
        self.tensors = {
            key: entry for key, entry in self.metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)
        }

    def global_shape(self, key: str) -> tuple[int, ...] | None:
        entry = self.tensors.get(key)
        return None if entry is None else tuple(entry.size)

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of tensor ``key`` (global coordinates)."""
        out = torch.empty(sizes, dtype=dtype)
        covered = 0
        for chunk in self.tensors[key].chunks:
            low = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            high = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(lo >= hi for lo, hi in zip(low, high)):
                continue
            data = self._load_chunk(key, chunk)
            source = tuple(slice(lo - c, hi - c) for lo, hi, c in zip(low, high, chunk.offsets))
            target = tuple(slice(lo - o, hi - o) for lo, hi, o in zip(low, high, offsets))
            out[target] = data[source]
            covered += math.prod(hi - lo for lo, hi in zip(low, high))
        if covered != math.prod(sizes):
            raise CheckpointContentError(f"{self.path}: tensor {key} is only partly stored (incomplete checkpoint?)")
        return out

    def _load_chunk(self, key: str, chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointContentError(f"{self.path}: {key} is stored with transforms {info.transform_descriptors}")
        with open(self.path / info.relative_path, "rb") as handle:
            handle.seek(info.offset)
            raw = handle.read(info.length)
        if len(raw) != info.length:
            raise CheckpointContentError(f"{self.path / info.relative_path}: truncated (reading {key})")
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
