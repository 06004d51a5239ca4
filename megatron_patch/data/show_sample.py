"""Show one training sample exactly as training will see it.

  python -m megatron_patch.data.show_sample data/sft --index 3 --json
  python -m megatron_patch.data.show_sample train.jsonl --tokenizer Qwen3-8B --index 0 --decode

SOURCE is a ``build_sft`` prefix, a ``build_pretrain`` prefix, or a .json/.jsonl SFT file (raw
mode, needs --tokenizer). --json prints tokens, labels, loss_mask (1 where that position's label
is trained), position_ids and sequences ([start, end) of each packed sample). --decode prints
the text of each sample with the trained part between ⟦ and ⟧.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_patch.data.build_sft import MASK_SUFFIX
from megatron_patch.data.datasets import RawJsonSftDataset, SftIdxmapDataset, pack_samples
from megatron_patch.data.tokenizer import Qwen3Tokenizer, TokenizerError
from megatron_patch.patches.warnings import silence_upstream_warnings

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def load_samples(source: Path, index: int, tokenizer, seq_length: int | None):
    """(whole samples as (ids, target mask), seq_length) of training sequence ``index``."""
    if source.suffix in (".json", ".jsonl"):
        if tokenizer is None:
            raise ValueError("a JSON source needs --tokenizer")
        dataset = RawJsonSftDataset(source, tokenizer, seq_length or 1 << 30)
    elif Path(f"{source}{MASK_SUFFIX}.idx").is_file():
        dataset = SftIdxmapDataset(source, seq_length or 0, pad_id=0)
    elif Path(f"{source}.idx").is_file():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        documents = IndexedDataset(str(source))
        if not 0 <= index < len(documents):
            raise IndexError(f"index {index} out of range: {source} holds {len(documents)} documents")
        ids = documents[index].tolist()
        return [(ids, [0] + [1] * (len(ids) - 1))], seq_length
    else:
        raise FileNotFoundError(f"{source}: not a .json/.jsonl file nor a dataset prefix (no {source}.idx)")
    if not 0 <= index < len(dataset):
        raise IndexError(f"index {index} out of range: {source} holds {len(dataset)} sequences")
    return dataset.samples(index), seq_length


def marked_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    pieces, run, trained = [], [], False
    for token, flag in zip(ids, mask):
        if bool(flag) != trained and run:
            text = tokenizer.decode(run)
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
            run = []
        trained = bool(flag)
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(pieces)


def main(argv=None) -> int:
    silence_upstream_warnings()
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.data.show_sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="dataset prefix or .json/.jsonl file")
    parser.add_argument("--index", type=int, default=0, help="which training sequence (default 0)")
    parser.add_argument("--tokenizer", type=Path, help="HF tokenizer dir (for JSON sources and --decode)")
    parser.add_argument("--seq-length", type=int, help="pad to this length, as training does (default: no padding)")
    parser.add_argument("--json", action="store_true", help="print the sample as JSON")
    parser.add_argument("--decode", action="store_true", help="print the text with the trained part marked")
    args = parser.parse_args(argv)

    try:
        tokenizer = Qwen3Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
        if args.decode and tokenizer is None:
            raise ValueError("--decode needs --tokenizer")
        samples, seq_length = load_samples(args.source, args.index, tokenizer, args.seq_length)
        positions = sum(len(ids) - 1 for ids, _ in samples)
        packed = pack_samples(samples, seq_length or positions, pad_id=tokenizer.pad if tokenizer else 0)
    except (ValueError, IndexError, FileNotFoundError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    boundaries = packed["cu_seqlens"].tolist()
    if args.json or not args.decode:
        print(json.dumps({
            "index": args.index,
            "tokens": packed["tokens"].tolist(),
            "labels": packed["labels"].tolist(),
            "loss_mask": [int(x) for x in packed["loss_mask"].tolist()],
            "position_ids": packed["position_ids"].tolist(),
            "sequences": [[s, e] for s, e in zip(boundaries[:-1], boundaries[1:])][: len(samples)],
        }))
    if args.decode:
        for number, (ids, mask) in enumerate(samples):
            print(f"--- sample {number} ({len(ids)} tokens, {sum(mask[1:])} trained)")
            print(marked_text(tokenizer, ids, mask))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
