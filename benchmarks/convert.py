"""Converter throughput and memory on a Qwen3-30B-A3B-shaped checkpoint, against `cp` of the same bytes.

Synthesises an HF bf16 checkpoint with the real model's widths (hidden 2048, 128 experts of
768, vocab 151936) and a few layers, then in the same run times:
  cp -r of the HF directory (the baseline: the least any conversion must do),
  HF -> torch_dist and torch_dist -> HF with the converter on --nproc processes,
and samples the peak RSS of every converter process. Prints throughput as a ratio to cp and
peak RSS per layer count, so memory growth with depth is visible. With --checksums-cost, each
direction also runs with MP_CHECKSUMS=0 (no checksums.json written or verified), and the cost of
checksums is printed as the ratio of the two times.

  python benchmarks/convert.py [--layers 4 8] [--nproc 2] [--workdir /tmp/convert-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]


def synthesize(layers: int, path: Path) -> int:
    """Write an A3B-shaped HF checkpoint with ``layers`` layers; returns its tensor bytes."""
    from megatron_patch.convert.template import plan_hf_tensors
    from megatron_patch.models.hf_checkpoint import StreamingSafetensorsWriter
    from megatron_patch.models.qwen3.presets import get_preset

    arch = get_preset("A3B").replace(num_layers=layers)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(arch.to_hf_config() | {"torch_dtype": "bfloat16"}, indent=2))
    plan = plan_hf_tensors(arch, "bf16")
    writer = StreamingSafetensorsWriter(path, plan, max_shard_bytes=4 << 30)
    writer.create_files()
    noise = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name, shape, dtype in plan:
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * dtype.itemsize
        data = noise[:nbytes] if nbytes <= noise.numel() else noise.repeat(-(-nbytes // noise.numel()))[:nbytes]
        writer.write(name, data.view(dtype).reshape(shape))
    writer.write_index()
    return writer.total_bytes


def run_measured(command: list[str], checksums: bool = True) -> tuple[float, int]:
    """Wall seconds and the peak RSS of the largest process in the command's tree."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore",
           "MP_CHECKSUMS": "1" if checksums else "0"}
    started = time.perf_counter()
    process = psutil.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            for member in [process, *process.children(recursive=True)]:
                peak = max(peak, member.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return seconds, peak


def converter(nproc: int, *args) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "megatron_patch.convert", "--precision", "bf16", *map(str, args)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/megatron_patch-convert-bench"))
    parser.add_argument("--checksums-cost", action="store_true",
                        help="also convert without checksums (MP_CHECKSUMS=0) and print the ratio")
    args = parser.parse_args()

    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.patches import apply_patches

    apply_patches()
    initialize_parallel(ParallelLayout())
    print(f"machine: {platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; torch {torch.__version__}; "
          f"{args.nproc} converter processes")
    rows, costs = [], []
    for layers in args.layers:
        shutil.rmtree(args.workdir, ignore_errors=True)
        hf, copy, mcore, back = (args.workdir / name for name in ("hf", "cp", "mcore", "back"))
        nbytes = synthesize(layers, hf)
        cp_seconds, _ = run_measured(["cp", "-r", str(hf), str(copy)])
        shutil.rmtree(copy)
        h2m_seconds, h2m_rss = run_measured(converter(args.nproc, "--load-dir", hf, "--save-dir", mcore))
        m2h_seconds, m2h_rss = run_measured(
            converter(args.nproc, "--mg2hf", "--load-dir", mcore, "--save-dir", back, "--hf-dir", hf)
        )
        rows.append((layers, nbytes, cp_seconds, h2m_seconds, m2h_seconds, h2m_rss, m2h_rss))
        if args.checksums_cost:
            costs.append((layers, *checksums_cost(args.nproc, hf, mcore, h2m_seconds, m2h_seconds)))
        shutil.rmtree(args.workdir)

    gb = 1e9
    print(f"{'layers':>6} {'GB':>6} {'cp s':>7} {'hf->td s':>9} {'ratio':>6} {'td->hf s':>9} {'ratio':>6} "
          f"{'peak RSS hf->td':>16} {'peak RSS td->hf':>16}")
    for layers, nbytes, cp_s, h2m_s, m2h_s, h2m_rss, m2h_rss in rows:
        print(f"{layers:>6} {nbytes / gb:>6.2f} {cp_s:>7.1f} {h2m_s:>9.1f} {cp_s / h2m_s:>5.2f}x {m2h_s:>9.1f} "
              f"{cp_s / m2h_s:>5.2f}x {h2m_rss / 2**30:>13.2f} GiB {m2h_rss / 2**30:>13.2f} GiB")
    print("ratio = cp seconds / converter seconds for the same bytes (1.0x = as fast as copying)")
    if costs:
        print(f"{'layers':>6} {'hf->td s':>9} {'without':>8} {'cost':>6} {'td->hf s':>9} {'without':>8} {'cost':>6}")
        for layers, h2m_s, h2m_plain, m2h_s, m2h_plain in costs:
            print(f"{layers:>6} {h2m_s:>9.1f} {h2m_plain:>8.1f} {h2m_s / h2m_plain:>5.2f}x {m2h_s:>9.1f} "
                  f"{m2h_plain:>8.1f} {m2h_s / m2h_plain:>5.2f}x")
        print("cost = seconds with checksums (written on save, verified on load) / seconds without (MP_CHECKSUMS=0)")


def checksums_cost(nproc: int, hf: Path, mcore: Path, h2m_seconds: float, m2h_seconds: float):
    """Both directions again without checksums, then once more with them (the two with-runs averaged)."""
    scratch = [mcore.with_name(name) for name in ("mcore-plain", "back-plain", "mcore-again", "back-again")]
    plain_mcore, plain_back, again_mcore, again_back = scratch
    h2m_plain, _ = run_measured(converter(nproc, "--load-dir", hf, "--save-dir", plain_mcore), checksums=False)
    m2h_plain, _ = run_measured(converter(nproc, "--mg2hf", "--load-dir", plain_mcore, "--save-dir", plain_back,
                                          "--hf-dir", hf), checksums=False)
    for path in (plain_mcore, plain_back):
        shutil.rmtree(path)
    h2m_again, _ = run_measured(converter(nproc, "--load-dir", hf, "--save-dir", again_mcore))
    m2h_again, _ = run_measured(converter(nproc, "--mg2hf", "--load-dir", again_mcore, "--save-dir", again_back,
                                          "--hf-dir", hf))
    return (h2m_seconds + h2m_again) / 2, h2m_plain, (m2h_seconds + m2h_again) / 2, m2h_plain

if __name__ == "__main__":
    main()
