"""Records from .jsonl (one per line), .json (an array) or .parquet (one per row) files, with errors that
name file:line (file:row N in parquet)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.errors import InputError
from megatron_patch.units import parse_size


class RecordError(InputError):
    """A bad input record; the message starts with ``file:line``."""


# Tokenizing a record takes about 130 times its bytes (a 50 MB line took 6.4 GB): lines over the
# limit are bad records (counted and skipped with --skip-bad-lines) and never held whole.
DEFAULT_MAX_RECORD_BYTES = 8 << 20


@dataclass(frozen=True)
class OversizedRecord:
    """Stands for a JSONL line over the size limit (its bytes were read past, not kept)."""

    size: int
    limit: int


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(reason)

    def reject(self, err: RecordError, skip_bad_lines: bool) -> None:
        """A bad record: counted and skipped with --skip-bad-lines, else the run stops with its line."""
        if not skip_bad_lines:
            raise type(err)(f"{err}; fix it or pass --skip-bad-lines") from None
        self.skip(str(err))


def add_max_record_bytes(parser) -> None:
    parser.add_argument("--max-record-bytes", type=parse_size, default=DEFAULT_MAX_RECORD_BYTES, metavar="SIZE",
                        help="longest JSONL line read as a record (default 8MiB; a record takes ~130x its size "
                             "in memory while tokenized); longer lines are bad records")


def iter_records(path: str | Path, stats: ReadStats, skip_bad_lines: bool = False,
                 max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[str, object]]:
    """(``file:line``, record) for every record; bad ones raise RecordError or are counted and skipped."""
    for where, raw in iter_raw_records(path, max_bytes):
        try:
            record = parse_record(where, raw)
        except RecordError as err:
            stats.reject(err, skip_bad_lines)
            continue
        stats.read += 1
        yield where, record


def iter_raw_records(path: str | Path, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[str, object]]:
    """(``file:line``, raw) with raw a JSONL line's bytes (for ``parse_record``, which may run in a
    worker process), an ``OversizedRecord`` for a line over ``max_bytes``, or, from a .json array,
    the record itself (a .json file is read whole)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _json_array(path)
        return
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(max_bytes + 1):
            number += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while rest := handle.readline(1 << 20):
                    size += len(rest)
                    if rest.endswith(b"\n"):
                        break
                yield f"{path}:{number}", OversizedRecord(size, max_bytes)
            elif raw.strip():
                yield f"{path}:{number}", raw


def parse_record(where: str, raw):
    """The record of a raw JSONL line (bytes); anything else is an already parsed record."""
    if isinstance(raw, OversizedRecord):
        raise RecordError(f"{where}: {raw.size / 2**20:.1f} MiB on one line, over the limit of "
                          f"{raw.limit / 2**20:g} MiB per record (--max-record-bytes)")
    if not isinstance(raw, bytes):
        return raw
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecordError(f"{where}: not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise RecordError(f"{where}: JSON nested too deeply to be a record") from None


def _json_array(path: Path) -> Iterator[tuple[str, object]]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise RecordError(f"{path}: JSON nested too deeply to hold records") from None
    if not isinstance(records, list):
        raise RecordError(f"{path}: a .json input must hold an array of records")
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _parquet_rows(path: Path, batch_rows: int = 1024) -> Iterator[tuple[str, object]]:
    """Each row as a plain dict (nested columns as dicts and lists), a batch of rows in memory at a time."""
    # Imported here: pyarrow.parquet takes 0.3 s, which every data builder and its workers would pay.
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise RecordError(f"{path}: not a parquet file ({err})") from None
    number, batches = 0, table.iter_batches(batch_size=batch_rows)
    while True:
        try:  # a damaged page shows only when its batch is decoded
            batch = next(batches, None)
        except (pyarrow.ArrowException, OSError, ValueError) as err:
            raise RecordError(f"{path}: cannot read the rows after row {number} (a damaged page?): "
                              f"{type(err).__name__}: {err}") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", row
