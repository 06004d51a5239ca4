"""LoRA vs full fine-tuning: trainable parameters, optimizer memory and checkpoint size.

Computed for a preset (default A3B) from the parameter counts: Adam on fp32 main weights keeps
12 bytes per trained parameter (main copy, two moments) plus a 4-byte fp32 gradient buffer, so
optimizer-side memory scales with the trained parameters. Measured for tiny-moe: two 1-step CPU
runs from the same converted checkpoint, a full fine-tuning save and a --save-lora-only save,
and the bytes each iteration directory holds.

  python benchmarks/lora_memory.py [--preset A3B] [--rank 8] [--targets all]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def computed(preset: str, rank: int, targets: list[str]) -> dict:
    from megatron_patch.lora.apply import trainable_parameter_count
    from megatron_patch.lora.config import LoraSettings
    from megatron_patch.models.qwen3.presets import get_preset

    arch = get_preset(preset)
    settings = LoraSettings(rank=rank, targets=tuple(targets))
    adapters, total = trainable_parameter_count(arch, settings), arch.parameter_counts()["total"]
    return {"preset": preset, "rank": rank, "targets": list(settings.targets), "adapter_parameters": adapters,
            "model_parameters": total, "fraction": adapters / total,
            "optimizer_gib_lora": 16 * adapters / 2**30, "optimizer_gib_full": 16 * total / 2**30,
            "adapter_checkpoint_gib_bf16": 2 * adapters / 2**30}


def measured(rank: int, targets: list[str]) -> dict:
    from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
    from megatron_patch.models.qwen3.presets import get_preset

    def run(*args):
        subprocess.run([sys.executable, "-m", *map(str, args)], check=True, capture_output=True, cwd=REPO)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        save_random_hf_checkpoint(get_preset("tiny-moe"), work / "hf")
        run("megatron_patch.convert", "--load-dir", work / "hf", "--save-dir", work / "mcore")
        source = work / "train.jsonl"
        source.write_text("".join((REPO / "megatron_patch/resources/demo_sft.jsonl").read_text().splitlines(True)[:16]))
        run("megatron_patch.data.build_sft", "--input", source, "--tokenizer", bundled_qwen3_tokenizer_dir(),
            "--seq-length", 128, "--output-prefix", work / "sft", "--packing")
        common = ["megatron_patch.train", "--model", work / "hf", "--train-mode", "finetune", "--sft-packing",
                  "--data-path", work / "sft", "--seq-length", 128, "--global-batch-size", 2, "--train-iters", 1,
                  "--split", "100,0,0", "--load", work / "mcore", "--precision", "bf16"]
        run(*common, "--save", work / "full")
        run(*common, "--save", work / "lora", "--lora-rank", rank, "--lora-target-modules", *targets,
            "--save-lora-only")
        full, lora = (directory_bytes(work / name / "iter_0000001") for name in ("full", "lora"))
    return {"full_checkpoint_bytes": full, "lora_checkpoint_bytes": lora, "fraction": lora / full}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="A3B")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["all"])
    args = parser.parse_args()
    big = computed(args.preset, args.rank, args.targets)
    print(f"{big['preset']} rank {big['rank']} on {' '.join(big['targets'])}: {big['adapter_parameters']:,} adapter "
          f"parameters of {big['model_parameters']:,} ({big['fraction']:.3%})")
    print(f"  optimizer + fp32 grads: {big['optimizer_gib_lora']:.2f} GiB (LoRA) vs "
          f"{big['optimizer_gib_full']:.1f} GiB "
          f"(full); adapter checkpoint {big['adapter_checkpoint_gib_bf16']:.2f} GiB in bf16")
    tiny = computed("tiny-moe", args.rank, args.targets)
    small = measured(args.rank, args.targets)
    print(f"tiny-moe rank {args.rank}: {tiny['adapter_parameters']:,} of {tiny['model_parameters']:,} parameters "
          f"({tiny['fraction']:.2%}); measured checkpoint (weights + optimizer, bf16 run): "
          f"{small['lora_checkpoint_bytes']:,} vs {small['full_checkpoint_bytes']:,} bytes ({small['fraction']:.2%})")


if __name__ == "__main__":
    main()
