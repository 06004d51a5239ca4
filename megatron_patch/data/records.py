"""JSON records from .jsonl (one per line) or .json (an array) files, with errors that name file:line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class RecordError(ValueError):
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
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _json_array(path, stats)
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                problem = f"{where}: not UTF-8 (byte {err.start})"
            except json.JSONDecodeError as err:
                problem = f"{where}: invalid JSON ({err.msg} at column {err.colno})"
            else:
                stats.read += 1
                yield where, record
                continue
            if not skip_bad_lines:
                raise RecordError(problem + "; fix it or pass --skip-bad-lines")
            stats.skip(problem)


def _json_array(path: Path, stats: ReadStats) -> Iterator[tuple[str, object]]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(records, list):
        raise RecordError(f"{path}: a .json input must hold an array of records")
    for index, record in enumerate(records):
        stats.read += 1
        yield f"{path}[{index}]", record
