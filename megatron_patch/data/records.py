"""JSON records from .jsonl (one per line) or .json (an array) files, with errors that name file:line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.errors import InputError


class RecordError(InputError):
    """A bad input record; the message starts with ``file:line``."""


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(reason)


def iter_records(path: str | Path, stats: ReadStats, skip_bad_lines: bool = False) -> Iterator[tuple[str, object]]:
    """(``file:line``, record) for every record; bad ones raise RecordError or are counted and skipped."""
    for where, raw in iter_raw_records(path):
        try:
            record = parse_record(where, raw)
        except RecordError as err:
            if not skip_bad_lines:
                raise RecordError(f"{err}; fix it or pass --skip-bad-lines") from None
            stats.skip(str(err))
            continue
        stats.read += 1
        yield where, record


def iter_raw_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(``file:line``, raw) with raw a JSONL line's bytes (for ``parse_record``, which may run in a
    worker process) or, from a .json array, the record itself."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _json_array(path)
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield f"{path}:{number}", raw


def parse_record(where: str, raw):
    """The record of a raw JSONL line (bytes); anything else is an already parsed record."""
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
