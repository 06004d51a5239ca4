"""Memory of training's --load from an HF directory, against the converter's, on a Qwen3-30B-A3B-shaped model.

Synthesises A3B-shaped HF bf16 checkpoints (the real widths: hidden 2048, 128 experts of 768,
vocab 151936) of a few layers and measures, in the same run, the peak RSS of:
  model:    a process that builds the bf16 Megatron-Core model (one process, every page touched) and
            loads nothing;
  HF load:  the same, then training's load_checkpoint of the HF directory (straight from safetensors);
  convert:  the converter's HF -> torch_dist of the same directory (one process).
What the HF load adds is (HF load - model); it should not grow with the layer count, and stays
within the converter's own working set.

  python benchmarks/load_hf.py [--layers 2 4] [--workdir /tmp/load-hf-bench]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
from pathlib import Path

from convert import converter, run_measured, synthesize  # benchmarks/convert.py

_LOAD = """
import sys
from megatron_patch.patches import apply_patches
from megatron_patch.parallel import ParallelLayout, initialize_parallel
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.training.checkpointing import load_checkpoint
apply_patches(); initialize_parallel(ParallelLayout())
arch = Qwen3Arch.from_hf_dir(sys.argv[1])
model = build_gpt_model(arch, BuildOptions(precision="bf16"), perform_initialization=False)
for parameter in model.parameters():  # resident, as an initialised model is
    parameter.data.zero_()
if sys.argv[2] == "load":
    load_checkpoint(sys.argv[1], [model], None, None, load_optim=False, arch=arch)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/load-hf-bench"))
    args = parser.parse_args()
    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.patches import apply_patches

    apply_patches()
    initialize_parallel(ParallelLayout())  # the synthesiser's tensor plan builds a meta model
    shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| layers | HF bytes | model only | model + HF load | HF load adds | converter HF -> torch_dist |")
    print("|---|---|---|---|---|---|")
    for layers in args.layers:
        hf_dir = args.workdir / f"hf-{layers}"
        total = synthesize(layers, hf_dir)
        _, model_only = run_measured([sys.executable, "-c", _LOAD, str(hf_dir), "build"])
        _, loaded = run_measured([sys.executable, "-c", _LOAD, str(hf_dir), "load"])
        _, converted = run_measured(converter(1, "--load-dir", hf_dir, "--save-dir", args.workdir / f"mcore-{layers}"))
        gib = 2**30
        print(f"| {layers} | {total / gib:.2f} GiB | {model_only / gib:.2f} GiB | {loaded / gib:.2f} GiB | "
              f"{(loaded - model_only) / gib:.2f} GiB | {converted / gib:.2f} GiB |", flush=True)
        shutil.rmtree(args.workdir / f"mcore-{layers}")
        shutil.rmtree(hf_dir)


if __name__ == "__main__":
    main()
