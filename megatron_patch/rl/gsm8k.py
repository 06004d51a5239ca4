"""The official GSM8K release -> prompt JSONL for GRPO.

  python -m megatron_patch.rl.gsm8k --input gsm8k/train.jsonl --output data/gsm8k-train.jsonl

Each ``{"question", "answer"}`` line becomes ``{"prompt": question + instruction, "label": N}``
with N the number after ``#### `` in the answer, commas removed (``#### 1,234`` -> ``1234``), and
verl's instruction. A line without a final answer, or that is not such an object, stops the
conversion with ``file:line`` (or is counted and skipped with ``--skip-bad-lines``). The output
is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from megatron_patch.data.records import ReadStats, RecordError, iter_records
from megatron_patch.errors import InputError, report_input_error

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
_FINAL = re.compile(r"#### (\-?[0-9\.\,]+)")


def label_of(answer: str) -> str | None:
    """The final answer of a GSM8K solution: the first ``#### N``, commas removed."""
    match = _FINAL.search(answer)
    return match.group(1).replace(",", "") if match else None


def prompt_record(record, where: str) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
            or not isinstance(record.get("answer"), str):
        raise RecordError(f"{where}: expected an object with string fields question and answer")
    label = label_of(record["answer"])
    if label is None:
        raise RecordError(f"{where}: the answer has no final '#### N'")
    return {"prompt": f"{record['question']} {INSTRUCTION}", "label": label}


def convert(source: Path, output: Path, skip_bad_lines: bool = False) -> tuple[int, int]:
    """(written, skipped)."""
    stats = ReadStats()
    temporary = output.with_name(f".{output.name}.incomplete.{os.getpid()}")
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            for where, record in iter_records(source, stats, skip_bad_lines):
                try:
                    line = prompt_record(record, where)
                except RecordError as err:
                    stats.reject(err, skip_bad_lines)
                    continue
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
        if written == 0:
            raise RecordError(f"{source}: no usable problem; nothing written")
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return written, stats.skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.rl.gsm8k", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="a GSM8K release file (train.jsonl, test.jsonl)")
    parser.add_argument("--output", type=Path, required=True, help="the prompt JSONL to write")
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip lines without an answer")
    args = parser.parse_args(argv)
    try:
        written, skipped = convert(args.input, args.output, args.skip_bad_lines)
    except InputError as err:
        return report_input_error(err)
    print(f"wrote {args.output}: {written} prompts" + (f", {skipped} skipped" if skipped else ""), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
