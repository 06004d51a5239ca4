"""Megatron-Core indexed datasets (PREFIX.bin / PREFIX.idx): written under temporary names and renamed
into place only when complete; checked for completeness before training reads them.

  PREFIX.idx: b"MMIDIDX\\x00\\x00", version <Q (1), dtype code <B, sequence count <Q, document count <Q,
              then int32 lengths and int64 byte pointers per sequence, int64 document indices
  PREFIX.bin: the tokens, back to back
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

from megatron_patch.errors import InputError
from megatron_patch.outputs import DestinationLock, OutputError, disk_full, no_space

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")


class IndexedDatasetError(InputError):
    """A PREFIX.bin/.idx pair that is missing, truncated or not an indexed dataset; names the file."""


def check_indexed_dataset(prefix: str | Path) -> int:
    """The number of sequences of PREFIX.bin/.idx, after checking both are whole (sizes and header)."""
    from megatron.core.datasets.indexed_dataset import DType
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise IndexedDatasetError(f"{path} not found")
    size = idx.stat().st_size
    with open(idx, "rb") as handle:
        raw = handle.read(_HEADER.size)
        if len(raw) < _HEADER.size or raw[:9] != INDEX_MAGIC:
            raise IndexedDatasetError(f"{idx}: not a Megatron indexed dataset index (bad or short header)")
        _, version, code, sequences, documents = _HEADER.unpack(raw)
        if version != 1 or code not in {member.value for member in DType}:
            raise IndexedDatasetError(f"{idx}: unsupported version {version} or dtype code {code}")
        expected = _HEADER.size + sequences * (4 + 8) + documents * 8
        if size < expected:
            raise IndexedDatasetError(f"{idx}: {size} bytes, its header needs {expected} (truncated)")
        if sequences:
            handle.seek(_HEADER.size + (sequences - 1) * 4)
            (last_length,) = struct.unpack("<i", handle.read(4))
            handle.seek(_HEADER.size + sequences * 4 + (sequences - 1) * 8)
            (last_pointer,) = struct.unpack("<q", handle.read(8))
            needed = last_pointer + last_length * DType.size(code)
            if bin_.stat().st_size < needed:
                raise IndexedDatasetError(f"{bin_}: {bin_.stat().st_size} bytes, {idx} needs {needed} (truncated)")
    return sequences


def _paths(prefix: Path, dtypes: dict) -> list[Path]:
    return [Path(f"{prefix}{suffix}{extension}") for suffix in dtypes for extension in (".bin", ".idx")]


@contextlib.contextmanager
def staged_indexed_datasets(output_prefix: str | Path, dtypes: dict[str, type], inputs=()):
    """Yield ``{suffix: IndexedDatasetBuilder}`` for ``PREFIX<suffix>.bin/.idx``, one per entry of ``dtypes``.

    On success every dataset is finalized and renamed into place; on any error (a full disk
    included) nothing is left. One builder per prefix at a time (``.PREFIX.lock``); an output
    that would overwrite one of ``inputs`` is refused.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    output_prefix = Path(output_prefix).absolute()
    finals = _paths(output_prefix, dtypes)
    for source in inputs:
        if Path(source).exists() and any(final.exists() and final.samefile(source) for final in finals):
            raise OutputError(f"--output-prefix {output_prefix} would overwrite the input {source}")
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    name = output_prefix.name
    with DestinationLock(output_prefix.with_name(f".{name}.lock"), Path(f"{output_prefix}.*"), "--output-prefix"):
        for stale in output_prefix.parent.glob(f".{name}.incomplete*"):
            stale.unlink(missing_ok=True)  # left by a killed builder: we hold the lock
        staging = output_prefix.with_name(f".{name}.incomplete.{os.getpid()}")
        builders = {}
        try:
            for suffix, dtype in dtypes.items():
                builders[suffix] = IndexedDatasetBuilder(f"{staging}{suffix}.bin", dtype=dtype)
            yield builders
            for suffix, builder in builders.items():
                builder.finalize(f"{staging}{suffix}.idx")
        except BaseException as failure:
            full = disk_full(failure, output_prefix.parent)
            for builder in builders.values():
                builder.data_file.close()
            for path in _paths(staging, dtypes):
                path.unlink(missing_ok=True)
            if full:
                raise no_space(Path(f"{output_prefix}.bin"), full) from None
            raise
        for staged, final in zip(_paths(staging, dtypes), finals):
            os.replace(staged, final)

