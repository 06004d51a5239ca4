"""python -m megatron_patch.plot RUN_DIR: the loss curve and the MoE expert-load heatmap of a run, as PNGs.

RUN_DIR is a training log directory (the one holding metrics.jsonl) or any directory above it,
e.g. run_mcore_qwen3.sh's OUTPUT_BASEPATH: every metrics.jsonl below it is plotted. Writes
loss.png (training and validation loss per iteration, and the learning rate on a second axis)
and, for MoE models, expert_load.png (share of routed tokens per layer and expert, summed over
the run; a balanced router is flat) beside each metrics.jsonl. Each plot is titled with the
run's name. For GRPO runs (python -m megatron_patch.rl), reward.png: the mean reward per step with
its spread (and the validation reward), and the mean response length on a second axis.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed, or wanted, on a cluster node
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

# Directory names that say where logs go, not which run they are.
_GENERIC_DIRS = ("log", "logs", "tensorboard")


def read_metrics(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    return records


def run_name(metrics_path: Path) -> str:
    """The run a metrics.jsonl belongs to: its directory, or the one above a generic ``log/``."""
    folder = metrics_path.parent
    while folder.name.lower() in _GENERIC_DIRS and folder.parent != folder:
        folder = folder.parent
    return folder.name or str(folder)


def _title(name: str) -> str:
    # Pai-style run names run to 150 characters: wrapped, not cut.
    return "\n".join(textwrap.wrap(name, 90, break_on_hyphens=True))


def plot_run(metrics_path: Path) -> list[Path]:
    records = read_metrics(metrics_path)
    name = run_name(metrics_path)
    written = []
    train = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["iteration"], r["valid_loss"]) for r in records if "valid_loss" in r]
    rates = [(r["iteration"], r["lr"]) for r in records if r.get("lr") is not None]
    path = metrics_path.parent / "loss.png"

    def losses(axes) -> list:
        lines = axes.plot(*zip(*train), label="training loss") if train else []
        return lines + (axes.plot(*zip(*valid), "o-", label="validation loss") if valid else [])

    written.append(_curves(path, name, "iteration", "loss (per token)", losses, rates, "learning rate",
                           scientific=True))

    rewards = [(r["iteration"], r["reward_mean"], r.get("reward_std", 0.0)) for r in records if "reward_mean" in r]
    if rewards:
        written.append(_plot_rewards(records, rewards, metrics_path.parent / "reward.png", name))

    loads = [np.asarray(r["expert_load"]) for r in records if "expert_load" in r]
    if loads:
        load = np.mean(loads, axis=0)
        figure, axes = plt.subplots(figsize=(max(6, load.shape[1] * 0.12 + 2), max(3, load.shape[0] * 0.15 + 1.5)))
        image = axes.imshow(load, aspect="auto", cmap="viridis")
        axes.set_xlabel("expert")
        axes.set_ylabel("layer")
        axes.set_title(f"{_title(name)}\nshare of routed tokens (balanced = {1 / load.shape[1]:.4f})", fontsize=8)
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        figure.savefig(metrics_path.parent / "expert_load.png", dpi=120)
        plt.close(figure)
        written.append(metrics_path.parent / "expert_load.png")
    return written


def _plot_rewards(records: list[dict], rewards: list[tuple], path: Path, name: str) -> Path:
    steps, means, spreads = (np.asarray(column, dtype=float) for column in zip(*rewards))
    valid = [(r["iteration"], r["valid_reward"]) for r in records if "valid_reward" in r]
    lengths = [(r["iteration"], r["response_length_mean"]) for r in records if "response_length_mean" in r]

    def reward(axes) -> list:
        lines = axes.plot(steps, means, label="reward (mean over samples)")
        axes.fill_between(steps, means - spreads, means + spreads, alpha=0.2)
        return lines + (axes.plot(*zip(*valid), "o-", label="validation reward (greedy)") if valid else [])

    return _curves(path, name, "step", "reward", reward, lengths, "response length (tokens)")


def _curves(path: Path, name: str, x_label: str, y_label: str, draw, secondary: list, secondary_label: str,
            scientific: bool = False) -> Path:
    """A figure of the curves ``draw(axes)`` plots (it returns their lines), with ``secondary`` (x, y)
    pairs dashed on a right-hand axis of their own; saved to ``path``."""
    figure, axes = plt.subplots(figsize=(7, 4))
    lines = draw(axes)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(_title(name), fontsize=8)
    axes.grid(alpha=0.3)
    if secondary:
        right = axes.twinx()
        lines += right.plot(*zip(*secondary), color="tab:gray", linestyle="--", linewidth=1, label=secondary_label)
        right.set_ylabel(secondary_label)
        if scientific:
            right.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if lines:
        axes.legend(lines, [line.get_label() for line in lines], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


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
