"""SFT data: Alpaca / ShareGPT / messages JSON(L) -> Megatron indexed datasets of tokens and loss masks.

  python -m megatron_patch.data.build_sft --input train.jsonl --tokenizer Qwen3-8B \\
      --seq-length 4096 --output-prefix data/sft --packing

Writes two Megatron-Core indexed datasets with the same structure:
  PREFIX.bin/.idx             token ids (int32)
  PREFIX_loss_mask.bin/.idx   1 where the token is a training target, else 0 (uint8)
Each document is one training sequence; each *sequence* inside a document is one sample, so
sample boundaries (for position ids and cu_seqlens) are Megatron's own sequence lengths. Without
--packing a document holds one sample; with it, first-fit-decreasing packs samples so that
sum(len(sample) - 1) <= SEQ_LENGTH (labels shift inside each sample; a sample that exactly fills
SEQ_LENGTH fits). Over-long samples are truncated (default) or skipped; a sample with no target
left is skipped; both are counted, never written empty. Rendering and masks: megatron_patch.data.chat.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.data.chat import SampleError, messages_from_record, tokenize_conversations
from megatron_patch.data.indexed import staged_indexed_datasets
from megatron_patch.data.packing import first_fit_decreasing
from megatron_patch.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    RecordError,
    add_max_record_bytes,
    iter_raw_records,
    parse_record,
)
from megatron_patch.data.tokenizer import Qwen3Tokenizer
from megatron_patch.data.workers import mapped_in_order, records_per_batch, spans
from megatron_patch.errors import InputError, report_input_error
from megatron_patch.patches.warnings import silence_upstream_warnings

MASK_SUFFIX = "_loss_mask"


@dataclass
class SftSummary:
    samples_read: int = 0
    samples_written: int = 0
    truncated: int = 0
    skipped_overlong: int = 0
    skipped_no_target: int = 0
    skipped_bad: int = 0
    documents: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"samples read {self.samples_read}, written {self.samples_written} in {self.documents} sequences; "
            f"truncated {self.truncated}; skipped: {self.skipped_overlong} over-long, "
            f"{self.skipped_no_target} without a target, {self.skipped_bad} bad; "
            f"tokens {self.tokens}, trained tokens {self.trained_tokens}"
        )


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, fmt: str, enable_thinking: bool, last_turn_only: bool) -> None:
    _WORKER.update(tokenizer=Qwen3Tokenizer.from_dir(tokenizer_dir), fmt=fmt, enable_thinking=enable_thinking,
                   last_turn_only=last_turn_only)


def _encode_batch(batch: list[tuple[str, object]]):
    """(bad, ids, masks, lengths) for raw records: ``bad`` lists (index in batch, where, reason);
    the others' ids and masks are concatenated (int32, uint8) with their lengths, in order.

    Three arrays per batch rather than two per sample: a worker's results cross to the parent
    process as a few buffers, not thousands of small pickled objects.
    """
    import numpy as np

    bad, conversations = [], []
    for index, (where, raw) in enumerate(batch):
        try:
            conversations.append(messages_from_record(parse_record(where, raw), _WORKER["fmt"]))
        except RecordError as err:
            bad.append((index, where, str(err).removeprefix(f"{where}: ")))
        except SampleError as err:
            bad.append((index, where, str(err)))
    pairs = tokenize_conversations(
        _WORKER["tokenizer"], conversations, _WORKER["enable_thinking"], _WORKER["last_turn_only"], as_arrays=True
    )
    lengths = np.array([len(ids) for ids, _ in pairs], dtype=np.int64)
    if not pairs:
        return bad, np.zeros(0, np.int32), np.zeros(0, np.uint8), lengths
    return bad, np.concatenate([ids for ids, _ in pairs]), np.concatenate([mask for _, mask in pairs]), lengths


def _results(encoded_batches):
    """("ok", ids, mask) or ("bad", where, reason) per record, in input order."""
    for bad, ids, masks, lengths in encoded_batches:
        samples = ((ids[span], masks[span]) for span in spans(lengths))
        bad_at = {index: (where, reason) for index, where, reason in bad}
        for index in range(len(lengths) + len(bad)):
            if index in bad_at:
                yield ("bad", *bad_at[index])
            else:
                yield ("ok", *next(samples))


def _record_batches(inputs, summary: SftSummary, batch_size: int, max_record_bytes: int):
    # Lines go to the workers unparsed: JSON decoding is part of the parallel work.
    batch = []
    for path in inputs:
        for item in iter_raw_records(path, max_record_bytes):
            summary.samples_read += 1
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def encode_samples(inputs, tokenizer_dir, fmt, seq_length, overlong, enable_thinking, last_turn_only,
                   skip_bad_lines, summary: SftSummary, workers: int = 1,
                   max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[tuple]:
    """(ids, mask) numpy arrays of every usable sample, in input order whatever the number of workers."""

    batches = _record_batches(inputs, summary, records_per_batch(workers), max_record_bytes)
    init_args = (str(tokenizer_dir), fmt, enable_thinking, last_turn_only)
    with mapped_in_order(_encode_batch, batches, workers, _init_worker, init_args) as encoded:
        return _usable_samples(_results(encoded), seq_length, overlong, skip_bad_lines, summary)


def _usable_samples(results, seq_length, overlong, skip_bad_lines, summary: SftSummary) -> list[tuple]:
    """Applies the bad-line and over-long policies to ("ok"/"bad", ...) results, counting each case."""
    samples = []
    limit = seq_length + 1  # tokens of a sample that yield at most seq_length training positions
    for kind, first, second in results:
        if kind == "bad":
            if not skip_bad_lines:
                raise RecordError(f"{first}: {second}; fix it or pass --skip-bad-lines")
            summary.skipped_bad += 1
            if len(summary.problems) < 5:
                summary.problems.append(f"{first}: {second}")
            continue
        ids, mask = first, second
        if len(ids) > limit:
            if overlong == "skip":
                summary.skipped_overlong += 1
                continue
            ids, mask = ids[:limit], mask[:limit]
            summary.truncated += 1
        # The first token is never a label (labels shift inside a sample).
        if not mask[1:].any():
            summary.skipped_no_target += 1
            continue
        samples.append((ids, mask))
    return samples


def build(inputs, tokenizer_dir, output_prefix, seq_length: int, packing: bool = False, fmt: str = "auto",
          overlong: str = "truncate", enable_thinking: bool = True, last_turn_only: bool = False,
          skip_bad_lines: bool = False, workers: int = 1,
          max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> SftSummary:
    import numpy as np

    summary = SftSummary()
    samples = encode_samples(inputs, tokenizer_dir, fmt, seq_length, overlong, enable_thinking, last_turn_only,
                             skip_bad_lines, summary, workers, max_record_bytes)
    if not samples:
        # An empty dataset would only fail later, inside training.
        raise RecordError(f"{', '.join(map(str, inputs))}: no usable sample ({summary}); nothing written")
    if packing:
        groups = first_fit_decreasing([len(ids) - 1 for ids, _ in samples], seq_length)
    else:
        groups = [[index] for index in range(len(samples))]

    with staged_indexed_datasets(output_prefix, {"": np.int32, MASK_SUFFIX: np.uint8}, inputs) as builders:
        for group in groups:
            lengths = [len(samples[i][0]) for i in group]
            ids = np.concatenate([samples[i][0] for i in group])
            mask = np.concatenate([samples[i][1] for i in group])
            builders[""].add_document(ids, lengths)
            builders[MASK_SUFFIX].add_document(mask, lengths)
            summary.documents += 1
            summary.samples_written += len(group)
            summary.tokens += len(ids)
            summary.trained_tokens += int(mask.sum()) - sum(int(samples[i][1][0]) for i in group)
    return summary


def main(argv=None) -> int:
    silence_upstream_warnings()
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.data.build_sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, type=Path, help=".jsonl or .json files")
    parser.add_argument("--tokenizer", required=True, type=Path, help="HF model or tokenizer directory (Qwen3)")
    parser.add_argument("--seq-length", required=True, type=int, help="training sequence length (SEQ_LEN)")
    parser.add_argument("--output-prefix", required=True, type=Path)
    parser.add_argument("--packing", action="store_true", help="pack samples into SEQ_LENGTH (first-fit-decreasing)")
    parser.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages"],
                        help="record format (default: detected per record)")
    parser.add_argument("--overlong", default="truncate", choices=["truncate", "skip"],
                        help="what to do with samples longer than SEQ_LENGTH + 1 tokens")
    parser.add_argument("--no-enable-thinking", dest="enable_thinking", action="store_false",
                        help="train Qwen3's non-thinking mode: drop reasoning, empty think blocks in the prompt")
    parser.add_argument("--last-turn-only", action="store_true", help="train only the last assistant turn")
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed records")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1); same output")
    add_max_record_bytes(parser)
    args = parser.parse_args(argv)
    if args.seq_length < 2:
        parser.error("--seq-length must be at least 2")

    try:
        summary = build(args.input, args.tokenizer, args.output_prefix, args.seq_length, args.packing, args.format,
                        args.overlong, args.enable_thinking, args.last_turn_only, args.skip_bad_lines, args.workers,
                        args.max_record_bytes)
    except InputError as err:  # bad records, tokenizer, output (locked, an input, disk full)
        return report_input_error(err)
    for problem in summary.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"wrote {args.output_prefix}.bin/.idx and {args.output_prefix}{MASK_SUFFIX}.bin/.idx: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
