"""Log-likelihood requests/s: our lm-eval ``megatron`` model vs lm-eval's ``hf`` model, same model and requests.

In one run: a random Qwen3-MoE (or dense) model is saved as HF (fp32) and converted to torch_dist;
both lm-eval models are built once, then score the same CMMLU-shaped requests (5-shot prompts
from the bundled synthetic data, 4 choices each) with the same batch size, --repeats times,
interleaved; the best time of each counts. Model construction is not timed. Printed: requests/s
of each and the ratio, plus the largest |log-likelihood| difference as a sanity check.

  python benchmarks/eval.py [--preset tiny-moe] [--requests 256] [--batch-size 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "megatron_patch" / "resources" / "eval_data" / "cmmlu"


def cmmlu_requests(count: int, shots: int = 5):
    """(context, continuation) pairs as lm-eval's cmmlu task writes them (description, k-shot, ' A'..' D')."""
    from lm_eval.api.instance import Instance

    def rows(split):
        found = []
        for subject in ("agronomy", "elementary_mathematics"):
            with (DATA / split / f"{subject}.csv").open(encoding="utf-8") as handle:
                found += list(csv.DictReader(handle))
        return found

    def text(row):
        return f"{row['Question'].strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案："

    dev, test = rows("dev"), rows("test")
    header = "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
    fewshot = "".join(f"{text(r)} {r['Answer']}\n\n" for r in dev[:shots])
    requests = []
    for index in range(count // 4):
        context = header + fewshot + text(test[index % len(test)])
        requests += [Instance("loglikelihood", {}, (context, f" {letter}"), len(requests)) for letter in "ABCD"]
    return requests


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
    from megatron_patch.evaluation.megatron_lm import MegatronLM
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
    from megatron_patch.models.qwen3.presets import get_preset

    arch = get_preset(args.preset)
    if args.layers:
        arch = arch.replace(num_layers=args.layers)
    with tempfile.TemporaryDirectory() as work:
        hf_dir, mcore_dir = Path(work) / "hf", Path(work) / "mcore"
        save_random_hf_checkpoint(arch, hf_dir)
        for path in Path(bundled_qwen3_tokenizer_dir()).iterdir():
            if path.is_file():
                shutil.copy(path, hf_dir / path.name)
        subprocess.run([sys.executable, "-m", "megatron_patch.convert", "--load-dir", str(hf_dir), "--save-dir",
                        str(mcore_dir), "--precision", "fp32"], check=True, capture_output=True)
        models = {
            "hf": HFLM(pretrained=str(hf_dir), dtype="float32", device=args.device, batch_size=args.batch_size),
            "megatron": MegatronLM(load=str(mcore_dir), batch_size=args.batch_size, device=args.device),
        }
        requests = cmmlu_requests(args.requests)
        best, scores = {name: float("inf") for name in models}, {}
        for _ in range(args.repeats):
            for name, model in models.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                scores[name] = model.loglikelihood(requests, disable_tqdm=True)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - started)
    difference = max(abs(a[0] - b[0]) for a, b in zip(scores["hf"], scores["megatron"]))
    tokens = sum(len(models["megatron"].tok_encode(r.args[0] + r.args[1])) for r in requests)
    print(f"{args.preset} ({arch.num_layers} layers), {len(requests)} requests ({tokens / len(requests):.0f} tokens "
          f"each), batch {args.batch_size}, {args.device}, fp32, best of {args.repeats}")
    for name in models:
        print(f"{name:9s} {len(requests) / best[name]:8.1f} requests/s  ({best[name]:.2f} s)")
    print(f"megatron / hf: {best['hf'] / best['megatron']:.2f}x   max |loglikelihood difference| {difference:.2e}")
    if args.json:
        report = {"preset": args.preset, "layers": arch.num_layers, "requests": len(requests), "device": args.device,
                  "batch_size": args.batch_size, "requests_per_s": {n: len(requests) / best[n] for n in models},
                  "megatron_over_hf": best["hf"] / best["megatron"], "max_loglikelihood_difference": difference}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
