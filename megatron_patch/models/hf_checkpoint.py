"""Read and write HF safetensors checkpoints, one tensor at a time.

Reading parses the safetensors header (8-byte length + JSON) and reads each
tensor's bytes with a plain file read, not an mmap: pages of a 60 GB
checkpoint never pile up in the process's resident memory, and nothing is
ever unpickled. Writing produces ``model-0000i-of-0000n.safetensors`` shards
plus ``model.safetensors.index.json``, the layout ``from_pretrained`` reads.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from megatron_patch.errors import InputError

INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class HFCheckpointError(InputError):
    pass


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors tile the data region exactly, as the safetensors format requires.

    Two tensors sharing bytes would let one silently replace the other (seen: model.norm.weight
    overwritten by a hand-edited header, converted with exit 0); gaps hide data nothing reads.
    """
    position = 0
    for begin, end, name in spans:
        if begin < position:
            raise HFCheckpointError(f"{path}: tensor {name} overlaps the tensor stored before it "
                                    f"(bytes {begin}..{end} of the data region; a damaged or hand-edited file)")
        if begin > position:
            raise HFCheckpointError(f"{path}: {begin - position} bytes before tensor {name} belong to no tensor "
                                    "(a damaged or hand-edited file)")
        position = end
    if position != data_bytes:
        raise HFCheckpointError(f"{path}: {data_bytes - position} bytes after the last tensor belong to no tensor "
                                "(a damaged or hand-edited file)")


class _SafetensorsFile:
    """Header of one .safetensors file, and tensor reads from it."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise HFCheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_size,) = struct.unpack("<Q", raw)
            if header_size > min(size - 8, 100 << 20):
                raise HFCheckpointError(f"{path}: not a safetensors file (header size {header_size})")
            try:
                header = json.loads(handle.read(header_size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HFCheckpointError(f"{path}: corrupt safetensors header") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_size
        self.entries = {}
        spans = []
        for name, info in header.items():
            try:
                dtype = _DTYPES.get(info.get("dtype"))
                begin, end = (int(x) for x in info.get("data_offsets", (0, -1)))
                shape = tuple(int(n) for n in info.get("shape", ()))
            except (AttributeError, TypeError, ValueError):
                raise HFCheckpointError(f"{path}: tensor {name} has a malformed header entry {info!r:.80}") from None
            if dtype is None:
                raise HFCheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            if end - begin != _numel(shape) * dtype.itemsize or begin < 0 or self.data_start + end > size:
                raise HFCheckpointError(f"{path}: tensor {name} has inconsistent offsets (truncated file?)")
            self.entries[name] = (dtype, shape, begin)
            spans.append((begin, end, name))
        _check_tiling(path, sorted(spans), size - self.data_start)

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self.data_start + begin)
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            while view.nbytes:
                count = handle.readinto(view)
                if not count:
                    raise HFCheckpointError(f"{self.path}: unexpected end of file reading {name}")
                view = view[count:]
        return tensor


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``: tensor name -> a file name in the index's own directory. Checked whole before
    any file it names is opened: a list, a non-string entry or a path leading elsewhere ("../x", "/abs")
    is refused naming the entry."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise HFCheckpointError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
    if not isinstance(weight_map, dict):
        raise HFCheckpointError(f"{index}: weight_map is a {type(weight_map).__name__}; expected an object of "
                                "tensor name -> file name")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise HFCheckpointError(f"{index}: weight_map entry {name!r} is {file!r}; expected a file name")
        if not file or Path(file).name != file or file in (".", ".."):
            raise HFCheckpointError(f"{index}: weight_map entry {name!r} names {file!r}, which is not a file in the "
                                    "index's own directory (paths elsewhere are refused, nothing was opened)")
    return weight_map


class HFCheckpoint:
    """The tensors of an HF model directory (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = _read_weight_map(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise HFCheckpointError(
                    f"{self.path}: no *.safetensors files (only safetensors checkpoints are read, never pickles)"
                )
            weight_map = None
        self._files: dict[str, _SafetensorsFile] = {}
        self._file_of: dict[str, _SafetensorsFile] = {}
        for name in files:
            if not (self.path / name).is_file():
                raise HFCheckpointError(f"{self.path / name}: listed in {INDEX_FILE} but missing")
            file = _SafetensorsFile(self.path / name)
            self._files[name] = file
            for tensor in file.entries:
                if tensor in self._file_of:
                    raise HFCheckpointError(f"{self.path}: tensor {tensor} is stored twice")
                self._file_of[tensor] = file
        if weight_map is not None:
            wrong = [n for n, f in weight_map.items() if n not in self._file_of or self._file_of[n].path.name != f]
            if wrong:
                raise HFCheckpointError(f"{index}: tensor {wrong[0]} is not in the file the index names")

    def _entry(self, name: str) -> _SafetensorsFile:
        try:
            return self._file_of[name]
        except KeyError:
            raise HFCheckpointError(f"{self.path}: no tensor named {name}") from None

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        return self._entry(name).read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).entries[name][0]

    def file_of(self, name: str) -> Path:
        return self._entry(name).path



_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class StreamingSafetensorsWriter:
    """Writes a sharded safetensors checkpoint whose tensor list is known up front.

    Headers (names, shapes, dtypes, offsets) are written first; each tensor's
    bytes are then written at their offset whenever the tensor is produced,
    in any order and from any process, so nothing has to be buffered. Shards
    are ``model-XXXXX-of-YYYYY.safetensors`` of at most ``max_shard_bytes``,
    plus ``model.safetensors.index.json`` (one ``model.safetensors`` if it fits).
    """

    def __init__(self, path: str | Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.path = Path(path)
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in tensors:
            nbytes = _numel(entry[1]) * entry[2].itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        count = len(groups)
        self.files: list[str] = [
            "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            for i in range(1, count + 1)
        ]
        self._location: dict[str, tuple[str, int, tuple[int, ...], torch.dtype]] = {}
        self._headers: list[tuple[str, bytes, int]] = []
        for file, group in zip(self.files, groups):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype in group:
                nbytes = _numel(shape) * dtype.itemsize
                header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                self._location[name] = (file, offset, tuple(shape), dtype)
                offset += nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            self._headers.append((file, encoded, offset))
        self.total_bytes = sum(data for _, _, data in self._headers)
        self._data_start = {file: 8 + len(encoded) for file, encoded, _ in self._headers}
        self._handles: dict[str, object] = {}

    def create_files(self) -> None:
        """Write every header and size every file (once, from one process)."""
        for file, encoded, data_bytes in self._headers:
            with open(self.path / file, "wb") as handle:
                handle.write(struct.pack("<Q", len(encoded)))
                handle.write(encoded)
                handle.truncate(8 + len(encoded) + data_bytes)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file, offset, shape, dtype = self._location[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        if file not in self._handles:
            self._handles[file] = open(self.path / file, "r+b", buffering=0)
        handle = self._handles[file]
        handle.seek(self._data_start[file] + offset)
        handle.write(memoryview(data))

    def sync(self) -> None:
        """Flush what this process wrote to disk (before the output is renamed into place)."""
        for handle in self._handles.values():
            os.fsync(handle.fileno())
            handle.close()
        self._handles.clear()

    def write_index(self) -> None:
        if len(self.files) == 1:
            return
        weight_map = {name: location[0] for name, location in self._location.items()}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
