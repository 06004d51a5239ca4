"""python -m megatron_patch.plot RUN_DIR: the loss curve and the MoE expert-load heatmap of a run, as PNGs.

RUN_DIR is a training log directory (the one holding metrics.jsonl) or any directory above it,
e.g. run_mcore_qwen3.sh's OUTPUT_BASEPATH: every metrics.jsonl below it is plotted. Writes
loss.png (training and validation loss per iteration) and, for MoE models, expert_load.png
(share of routed tokens per layer and expert, summed over the run; a balanced router is flat)
beside each metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    return records


def plot_run(metrics_path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(metrics_path)
    written = []
    train = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["iteration"], r["valid_loss"]) for r in records if "valid_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="training loss")
    if valid:
        axes.plot(*zip(*valid), "o-", label="validation loss")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss (per token)")
    axes.set_title(metrics_path.parent.name[:80], fontsize=8)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(metrics_path.parent / "loss.png", dpi=120)
    plt.close(figure)
    written.append(metrics_path.parent / "loss.png")

    loads = [np.asarray(r["expert_load"]) for r in records if "expert_load" in r]
    if loads:
        load = np.mean(loads, axis=0)
        figure, axes = plt.subplots(figsize=(max(6, load.shape[1] * 0.12 + 2), max(3, load.shape[0] * 0.15 + 1.5)))
        image = axes.imshow(load, aspect="auto", cmap="viridis")
        axes.set_xlabel("expert")
        axes.set_ylabel("layer")
        axes.set_title(f"share of routed tokens (balanced = {1 / load.shape[1]:.4f})", fontsize=9)
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        figure.savefig(metrics_path.parent / "expert_load.png", dpi=120)
        plt.close(figure)
        written.append(metrics_path.parent / "expert_load.png")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir}: no such directory", file=sys.stderr)
        return 2
    found = sorted(args.run_dir.rglob("metrics.jsonl"))
    if not found:
        print(f"error: {args.run_dir}: no metrics.jsonl below it (the training --log-dir writes one)", file=sys.stderr)
        return 2
    for path in found:
        try:
            for image in plot_run(path):
                print(f"wrote {image}")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
