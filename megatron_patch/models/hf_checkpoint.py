"""Lazy, read-only access to an HF safetensors checkpoint (single file or sharded with an index).

Tensors are read one at a time with ``safe_open``; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFCheckpointError(ValueError):
    pass


class HFCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise HFCheckpointError(f"{index}: not a safetensors index ({err})") from None
            self._file_of = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise HFCheckpointError(
                    f"{self.path}: no *.safetensors files (only safetensors checkpoints are read, never pickles)"
                )
            self._file_of = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    self._file_of.update({name: file for name in handle.keys()})
        self._handles: dict[Path, object] = {}

    def _handle(self, name: str):
        try:
            file = self._file_of[name]
        except KeyError:
            raise HFCheckpointError(f"{self.path}: no tensor named {name}") from None
        if file not in self._handles:
            if not file.is_file():
                raise HFCheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def __len__(self) -> int:
        return len(self._file_of)
