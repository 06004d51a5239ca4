"""SFT (or pretraining) preprocessing throughput against bare `tokenizers` batch encoding of the same texts.

In one run: synthesise multi-turn SFT records (messages, ShareGPT and Alpaca, mixed), render
them with the Qwen3 template, and time
  bare:      tokenizers' encode_batch of the rendered texts (the limit: tokenizing only),
  1 worker:  python -m megatron_patch.data.build_sft (read JSONL, parse, render, tokenize, masks,
             pack, write both indexed datasets),
  2 workers: the same with --workers 2.
With --kind pretrain the rendered texts are the documents of a {"text": ...} JSONL file, and the
build is python -m megatron_patch.data.build_pretrain (read, tokenize, EOD, write).
Each is run --repeats times, interleaved, and the best time of each counts (this 2-core machine's
timings wander by +-20 % between runs; best-of treats the limit and the build alike). The bare
encode and the one-worker build are single-threaded in this process, so their CPU time
(time.process_time) is reported too: it leaves out what other tenants of the machine take, which
wall time does not.
Printed as tokens/s and ratios. Everything runs with TOKENIZERS_PARALLELISM=false: one thread per
process, so the worker count is the parallelism (tokenizers disables its threads in forked workers
anyway). Megatron-Core (whose IndexedDatasetBuilder writes the files) is imported before timing:
its one-time import is start-up cost, printed separately, not throughput.

  python benchmarks/preprocess.py [--kind sft|pretrain] [--records 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

WORDS = ("the model data training loss mask token sequence expert router layer attention value "
         "数据 训练 模型 专家 注意力 你好 世界 问题 回答 思考").split()


def synthesise(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    records = []
    for i in range(count):
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": text(5, 20)}]
        for _ in range(turns):
            messages += [{"role": "user", "content": text(10, 80)}, {"role": "assistant", "content": text(20, 200)}]
        if i % 3 == 0:
            records.append({"messages": messages})
        elif i % 3 == 1:
            records.append({"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                               "value": m["content"]} for m in messages]})
        else:
            records.append({"instruction": messages[1]["content"], "output": messages[2]["content"]})
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["sft", "pretrain"], default="sft")
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from megatron_patch.data import build_pretrain, build_sft
    from megatron_patch.data.chat import messages_from_record, render
    from megatron_patch.data.tokenizer import Qwen3Tokenizer, bundled_qwen3_tokenizer_dir

    started = time.perf_counter()
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (start-up cost, timed on its own)

    import_seconds = time.perf_counter() - started
    tokenizer_dir = bundled_qwen3_tokenizer_dir()
    tokenizer = Qwen3Tokenizer.from_dir(tokenizer_dir)
    records = synthesise(args.records)
    with tempfile.TemporaryDirectory() as work:
        texts = [render(messages_from_record(r))[0] for r in records]
        source = Path(work) / "train.jsonl"
        lines = records if args.kind == "sft" else [{"text": t} for t in texts]
        source.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))

        def build(workers):
            output = Path(work) / f"out{workers}"
            if args.kind == "sft":
                summary = build_sft.build([source], tokenizer_dir, output, args.seq_length, packing=True,
                                          workers=workers)
                return summary.tokens
            return build_pretrain.build([source], tokenizer_dir, output, workers=workers).tokens - len(texts)  # EODs

        best = {"bare": float("inf"), 1: float("inf"), 2: float("inf")}
        best_cpu = {"bare": float("inf"), 1: float("inf")}
        times = {"bare": [], 1: [], 2: []}
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            encodings = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
            bare_tokens = sum(len(e.ids) for e in encodings)
            best_cpu["bare"] = min(best_cpu["bare"], time.process_time() - started_cpu)
            best["bare"] = min(best["bare"], time.perf_counter() - started)
            times["bare"].append(time.perf_counter() - started)
            del encodings
            for workers in (1, 2):
                started, started_cpu = time.perf_counter(), time.process_time()
                tokens = build(workers)
                if workers == 1:
                    best_cpu[1] = min(best_cpu[1], time.process_time() - started_cpu)
                best[workers] = min(best[workers], time.perf_counter() - started)
                times[workers].append(time.perf_counter() - started)
                assert tokens == bare_tokens, (tokens, bare_tokens)
        bare, rates = bare_tokens / best["bare"], {w: bare_tokens / best[w] for w in (1, 2)}

    print(f"{args.kind}: {args.records} records, {bare_tokens} tokens; {os.cpu_count()} cores; "
          "TOKENIZERS_PARALLELISM=false; "
          f"megatron.core import (once per run) {import_seconds:.1f} s; best of {args.repeats}")
    print("seconds per run:", {k: [round(t, 2) for t in v] for k, v in times.items()})
    print(f"bare tokenizers encode_batch   {bare:12,.0f} tokens/s")
    name = f"build_{args.kind}"
    print(f"{name + ', 1 worker':<31}{rates[1]:12,.0f} tokens/s   {rates[1] / bare:.2f}x bare")
    print(f"  CPU time, 1 worker vs bare   {best_cpu[1]:.2f} s vs {best_cpu['bare']:.2f} s   "
          f"{best_cpu['bare'] / best_cpu[1]:.2f}x bare")
    print(f"{name + ', 2 workers':<31}{rates[2]:12,.0f} tokens/s   {rates[2] / rates[1]:.2f}x one worker")


if __name__ == "__main__":
    main()
