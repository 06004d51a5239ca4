"""Convert Qwen3 / Qwen3-MoE checkpoints between HF safetensors and Megatron-Core torch_dist.

HF -> torch_dist (default):
  python -m megatron_patch.convert --load-dir Qwen3-30B-A3B --save-dir Qwen3-30B-A3B-mcore --precision bf16
  writes SAVE_DIR/latest_checkpointed_iteration.txt ("release"), SAVE_DIR/release/ and the HF
  config/tokenizer files; training loads it with --load SAVE_DIR and starts fine-tuning at iteration 0.

torch_dist -> HF:
  python -m megatron_patch.convert --mg2hf --load-dir RUN/checkpoint --save-dir out-hf --hf-dir Qwen3-30B-A3B
  reads the iteration the tracker names (or --iteration), ignores optimizer state, and writes
  sharded *.safetensors + model.safetensors.index.json; config/tokenizer come from --hf-dir
  (default: the files saved beside the torch_dist checkpoint).

Conversion runs on CPU, streams tensor by tensor and never needs a GPU. torch_dist checkpoints do
not depend on the parallel layout: one written here loads at any TP/PP/EP/ETP. Under torchrun,
the processes split the work. Bad input: one line on stderr and exit status 2; the output
directory appears only when complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_patch.convert.config import ConvertConfig
from megatron_patch.errors import exit_on_input_error
from megatron_patch.models.choices import PRECISIONS
from megatron_patch.parallel import ParallelLayout
from megatron_patch.patches import apply_patches, silence_upstream_warnings
from megatron_patch.units import parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_patch.convert", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--load-dir", type=Path, required=True, help="HF model dir, or torch_dist dir with --mg2hf")
    parser.add_argument("--save-dir", type=Path, required=True,
                        help="output dir; must be empty or absent unless --force")
    parser.add_argument("--mg2hf", action="store_true", help="convert torch_dist -> HF (default: HF -> torch_dist)")
    parser.add_argument("--hf-dir", type=Path, help="with --mg2hf: HF dir whose config/tokenizer files to use")
    parser.add_argument("--model-size", default="auto",
                        help="'auto' (read config.json) or a preset (A3B, 8B, ...), checked against config.json")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", dest="max_shard_bytes",
                        help="largest HF safetensors shard (default 5GB)")
    parser.add_argument("--iteration", help="with --mg2hf: iteration number or 'release' (default: the tracker's)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty SAVE_DIR")
    parser.add_argument("--verify", action="store_true",
                        help="after converting, compare logits of both sides on a short prompt (single process)")
    parser.add_argument("--check-finite", action="store_true",
                        help="refuse weights holding NaN or Inf (after the cast to --precision), naming the tensors")
    parser.add_argument("--use-cuda", action="store_true", help="run --verify on the GPU (conversion itself is CPU)")
    layout = parser.add_argument_group(
        "layout (Pai's MODEL_PARALLEL_ARGS)",
        "torch_dist checkpoints load at any layout; these sizes are checked against the model and recorded",
    )
    for flag, field in [("tensor", "tp"), ("pipeline", "pp"), ("expert", "ep"), ("expert-tensor", "etp")]:
        name = "--expert-tensor-parallel-size" if flag == "expert-tensor" else f"--{flag}-model-parallel-size"
        layout.add_argument(name, type=int, default=1, dest=field, metavar="N")
    return parser


def parse_config(argv=None) -> ConvertConfig:
    args = vars(build_parser().parse_args(argv))
    layout = ParallelLayout(**{k: args.pop(k) for k in ("tp", "pp", "ep", "etp")})
    return ConvertConfig(**args, layout=layout)


def main(argv=None) -> int:
    config = parse_config(argv)
    silence_upstream_warnings()
    # Entry point: Megatron-Core (~5 s to import) only after the arguments are known to be good.
    from megatron_patch.convert.run import convert

    apply_patches()
    return exit_on_input_error(lambda: convert(config))


if __name__ == "__main__":
    raise SystemExit(main())
