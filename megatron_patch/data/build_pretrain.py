"""Pretraining data: JSONL/JSON documents -> Megatron-Core indexed dataset (PREFIX.bin / PREFIX.idx).

  python -m megatron_patch.data.build_pretrain --input a.jsonl b.jsonl --tokenizer Qwen3-8B \\
      --output-prefix data/corpus_text_document --workers 2

Each document's text (``--json-key``, default ``text``) is tokenized with the Qwen3 tokenizer and
followed by ``<|endoftext|>`` (EOD). The files are Megatron-Core's own format, read unchanged by
``IndexedDataset`` and ``GPTDataset`` (blends and splits). They are written under temporary
names and renamed when complete. Bad lines stop the run with file:line, or with
``--skip-bad-lines`` are counted and reported.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.data.indexed import staged_indexed_datasets
from megatron_patch.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    ReadStats,
    RecordError,
    add_max_record_bytes,
    iter_records,
)
from megatron_patch.data.tokenizer import Qwen3Tokenizer
from megatron_patch.data.workers import mapped_in_order, records_per_batch, spans
from megatron_patch.errors import InputError, report_input_error
from megatron_patch.patches.warnings import silence_upstream_warnings

_WORKER_TOKENIZER = None


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    skipped: int = 0

    def __str__(self) -> str:
        return f"{self.documents} documents, {self.tokens} tokens (EOD included), {self.skipped} skipped"


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER

    _WORKER_TOKENIZER = Qwen3Tokenizer.from_dir(tokenizer_dir)


def _encode(texts: list[str]):
    """(ids, lengths): the documents' ids, each followed by EOD, concatenated (int32), and their lengths.

    Two arrays per batch rather than a list per document: a worker's results cross to the parent
    process as a few buffers, not thousands of small pickled lists.
    """
    import numpy as np

    documents = _WORKER_TOKENIZER.encode_batch(texts)
    lengths = np.array([len(ids) + 1 for ids in documents], dtype=np.int64)
    ids = np.empty(int(lengths.sum()), dtype=np.int32)
    for document, span in zip(documents, spans(lengths)):
        ids[span.start:span.stop - 1] = document
        ids[span.stop - 1] = _WORKER_TOKENIZER.eod
    return ids, lengths


def _text_batches(inputs, key: str, skip_bad_lines: bool, summary: Summary, batch_size: int, max_record_bytes: int):
    batch = []
    for path in inputs:
        stats = ReadStats()
        for where, record in iter_records(path, stats, skip_bad_lines, max_record_bytes):
            text = record.get(key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                problem = f"{where}: no string field {key!r}"
                if not skip_bad_lines:
                    raise RecordError(problem + "; fix it, choose --json-key, or pass --skip-bad-lines")
                stats.skip(problem)
                continue
            batch.append(text)
            if len(batch) == batch_size:
                yield batch
                batch = []
        summary.skipped += stats.skipped
        for example in stats.skipped_examples:
            print(f"skipped: {example}", file=sys.stderr)
    if batch:
        yield batch


def build(inputs, tokenizer_dir, output_prefix, key: str = "text", workers: int = 1,
          skip_bad_lines: bool = False, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Summary:
    import numpy as np
    from tqdm import tqdm

    summary = Summary()
    batches = _text_batches(inputs, key, skip_bad_lines, summary, records_per_batch(workers), max_record_bytes)
    with staged_indexed_datasets(output_prefix, {"": np.int32}, inputs) as builders, \
            mapped_in_order(_encode, batches, workers, _init_worker, (str(tokenizer_dir),)) as encoded, \
            tqdm(unit=" docs", desc="tokenizing", mininterval=1.0, disable=None) as bar:
        for ids, lengths in encoded:
            for span, length in zip(spans(lengths), lengths.tolist()):
                builders[""].add_document(ids[span], [length])
            summary.documents += len(lengths)
            summary.tokens += len(ids)
            bar.update(len(lengths))
    return summary


def main(argv=None) -> int:
    silence_upstream_warnings()
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.data.build_pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, type=Path, help=".jsonl or .json files")
    parser.add_argument("--tokenizer", required=True, type=Path, help="HF model or tokenizer directory")
    parser.add_argument("--output-prefix", required=True, type=Path, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="field holding the document text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed lines")
    add_max_record_bytes(parser)
    args = parser.parse_args(argv)

    try:
        summary = build(args.input, args.tokenizer, args.output_prefix, args.json_key, args.workers,
                        args.skip_bad_lines, args.max_record_bytes)
    except InputError as err:  # bad records, tokenizer, output (locked, an input, disk full)
        return report_input_error(err)
    print(f"wrote {args.output_prefix}.bin/.idx: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
