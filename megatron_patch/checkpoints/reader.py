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
import re
from pathlib import Path

import torch

from megatron_patch.checkpoints.layout import CheckpointError
from megatron_patch.checkpoints.manifest import verify_manifest
from megatron_patch.patches.safe_checkpoints import read_dcp_metadata


class _FileView(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a seekable file for ``torch.load``."""

    def __init__(self, handle, offset: int, length: int):
        self.handle, self.offset, self.length, self.position = handle, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = min(max(base + position, 0), self.length)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.length - self.position)
        if count <= 0:
            return 0
        self.handle.seek(self.offset + self.position)
        read = self.handle.readinto(memoryview(buffer)[:count])
        self.position += read
        return read


class TorchDistCheckpoint:
    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise CheckpointError(f"{self.path}: no .metadata (not a torch_dist checkpoint)")
        verify_manifest(self.path)  # collective: every process of the default group opens the checkpoint
        self.metadata = read_dcp_metadata(self.path)  # allowlisted: a planted pickle runs nothing
        self.tensors = {
            key: entry for key, entry in self.metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)
        }
        self._index: dict[str, tuple[int, dict]] = {}
        self._handles: dict[str, object] = {}

    def _chunks_for(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]):
        """The chunks of ``key`` that may overlap the region, via an index on the leading unit axes.

        Megatron stores a chunk per layer / expert: along the prepended axes every chunk has
        size 1, so those offsets identify the chunk directly (no scan over 18k experts).
        """
        if key not in self._index:
            chunks = self.tensors[key].chunks
            axes = 0
            while axes < len(chunks[0].sizes) - 1 and all(c.sizes[axes] == 1 for c in chunks):
                axes += 1
            table: dict[tuple, list] = {}
            for chunk in chunks:
                table.setdefault(tuple(chunk.offsets[:axes]), []).append(chunk)
            self._index[key] = (axes, table)
        axes, table = self._index[key]
        if all(n == 1 for n in sizes[:axes]):
            return table.get(tuple(offsets[:axes]), [])
        return self.tensors[key].chunks

    def global_shape(self, key: str) -> tuple[int, ...] | None:
        entry = self.tensors.get(key)
        return None if entry is None else tuple(entry.size)

    def locate(self, key: str, offsets: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        """(stored key, offsets) of a region given in stacked-layer coordinates.

        Stacked layer keys are the default; checkpoints written with a list-valued
        ``moe_layer_freq`` (e.g. Pai's ``([1]*48)``) have per-layer keys instead.
        """
        if key not in self.tensors and key.startswith("decoder.layers.") and offsets:
            per_layer = re.sub(r"^decoder\.layers\.", f"decoder.layers.{offsets[0]}.", key)
            if per_layer in self.tensors:
                return per_layer, offsets[1:]
        return key, offsets

    def read(
        self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype, out=None
    ) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of tensor ``key`` (global coordinates), into ``out`` if given."""
        out = torch.empty(sizes, dtype=dtype) if out is None else out.view(sizes)
        covered = 0
        for chunk in self._chunks_for(key, offsets, sizes):
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
            raise CheckpointError(f"{self.path}: tensor {key} is only partly stored (incomplete checkpoint?)")
        return out

    def _load_chunk(self, key: str, chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{self.path}: {key} is stored with transforms {info.transform_descriptors}")
        if info.relative_path not in self._handles:
            handle = open(self.path / info.relative_path, "rb", buffering=0)
            self._handles[info.relative_path] = (handle, handle.seek(0, io.SEEK_END))
        handle, size = self._handles[info.relative_path]
        if size < info.offset + info.length:
            raise CheckpointError(f"{self.path / info.relative_path}: truncated (reading {key})")
        return torch.load(_FileView(handle, info.offset, info.length), map_location="cpu", weights_only=True)
