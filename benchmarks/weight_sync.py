"""The vLLM weight sync's time and the trainer's host memory, by bucket size, measured in one run.

Each bucket size runs in a fresh process (a process's freed memory is not handed back to the system
at once, so one process would carry one measurement into the next): a random Qwen3 model is built,
vLLM's engine started (rl/vllm_engine.py; needs make setup-vllm), and its weights synced twice. A
thread samples the process's resident memory (VmRSS) every 5 ms during the first sync: the peak
above the memory before it is what the sync itself holds (the host copies of the shards, the HF
tensors, what safetensors writes). The first, not the second: the allocator keeps freed pages and
hands them out again, so a second sync would not show. The second sync is the one timed. Prints
each size's figures and their ratio against the first size given.

  python benchmarks/weight_sync.py --model 0.6B --bucket-mb 100000 1024 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(model: str, layers: int | None, bucket_mb: int) -> dict:
    """One bucket size, in this process: (seconds of the second sync, peak extra RSS, buckets)."""
    import torch

    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.models.qwen3.presets import get_preset
    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.patches import apply_patches
    from megatron_patch.patches.warnings import silence_upstream_warnings
    from megatron_patch.rl.vllm_engine import VllmEngine, hf_weight_buckets, vllm_python

    silence_upstream_warnings()
    apply_patches(cpu=True)
    initialize_parallel(ParallelLayout(), backend="gloo")
    arch = get_preset(model)
    if layers:
        arch = arch.replace(num_layers=layers)
    torch.manual_seed(0)
    gpt = build_gpt_model(arch, BuildOptions(precision="fp32", aux_loss_coeff=0.0)).eval()
    engine = VllmEngine(arch, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=4,
                        log_path=Path(tempfile.gettempdir()) / "weight-sync-vllm.log")
    try:
        before, peak, done = _rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        engine.sync(hf_weight_buckets([gpt], arch, bucket_mb * 2**20))
        done.set()
        sampler.join()
        seconds = engine.sync(hf_weight_buckets([gpt], arch, bucket_mb * 2**20))
        weights = sum(p.numel() * p.element_size() for p in gpt.parameters())
        return {"bucket_mb": bucket_mb, "seconds": seconds, "peak_extra_bytes": max(peak[0] - before, 0),
                "buckets": engine.synced_buckets, "weight_bytes": weights}
    finally:
        engine.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="0.6B", help="a preset (default 0.6B)")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=(100_000, 1024, 128),
                        help="bucket sizes to compare; the first is the baseline (default: 100000 = one bucket)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one size, JSON out
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.model, args.layers, args.bucket_mb[0])))
        return 0
    results = []
    for size in args.bucket_mb:
        command = [sys.executable, __file__, "--one", "--model", args.model, "--bucket-mb", str(size)]
        command += ["--layers", str(args.layers)] if args.layers else []
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gib = 2**30
    print(f"{args.model}{f' ({args.layers} layers)' if args.layers else ''} fp32 on cpu: "
          f"{results[0]['weight_bytes'] / gib:.2f} GiB of weights, second sync of each")
    base = results[0]
    for r in results:
        memory = r["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
        print(f"  bucket {r['bucket_mb']:>6} MB: {r['buckets']:4d} buckets, {r['seconds']:6.2f} s, host memory "
              f"+{r['peak_extra_bytes'] / gib:.2f} GiB at peak ({memory:.2f}x, "
              f"time {r['seconds'] / base['seconds']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
