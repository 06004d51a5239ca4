"""Export a LoRA checkpoint saved by megatron_patch.train: merged HF model and/or HF PEFT adapter.

  python -m megatron_patch.lora --adapter RUN/checkpoint --merged-out qwen3-sft-hf --peft-out qwen3-sft-peft \\
      --hf-dir Qwen3-30B-A3B

--merged-out: the base model with the adapters merged in (W + alpha/r * B @ A), written by the
  converter as sharded HF safetensors with the config/tokenizer files; loads in transformers
  and vLLM like any Qwen3 checkpoint.
--peft-out: adapter_config.json + adapter_model.safetensors, which
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_BASE), DIR) loads onto the
  HF base model (per-expert keys; peft 0.21 fuses them for transformers' MoE experts).

The base weights come from the checkpoint itself when it is a full save, otherwise from --base,
or from the checkpoint training loaded (recorded in the save). --hf-dir gives config and
tokenizer files (default: those beside the base checkpoint) and, for --verify, the HF base
model the PEFT adapter is applied to. Runs on CPU in one process; outputs appear only when
complete. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_patch.errors import exit_on_input_error
from megatron_patch.models.choices import PRECISIONS
from megatron_patch.patches import apply_patches, silence_upstream_warnings
from megatron_patch.units import parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True,
                        help="LoRA save directory (--save of the run) or one of its iter_* directories")
    parser.add_argument("--iteration", help="iteration to export (default: the latest saved)")
    parser.add_argument("--merged-out", type=Path, help="write the merged HF model here")
    parser.add_argument("--peft-out", type=Path, help="write the HF PEFT adapter here")
    parser.add_argument("--base", type=Path,
                        help="torch_dist base model the adapters were trained on (default: the checkpoint's own "
                             "base weights, else the --load recorded at training time)")
    parser.add_argument("--hf-dir", type=Path, help="HF base model dir: config/tokenizer files, PEFT base for --verify")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="dtype of the written tensors")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", dest="max_shard_bytes",
                        help="largest safetensors shard of the merged model (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace non-empty output directories")
    parser.add_argument("--verify", action="store_true",
                        help="compare the outputs' logits with the Megatron model plus adapters on a short prompt")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merged_out is None and args.peft_out is None:
        parser.error("nothing to write: give --merged-out and/or --peft-out")
    silence_upstream_warnings()
    # Entry point: Megatron-Core (~5 s to import) only after the arguments are known to be good.
    from megatron_patch.lora.export import ExportSettings, export

    apply_patches()
    return exit_on_input_error(lambda: export(ExportSettings(**vars(args))))


if __name__ == "__main__":
    raise SystemExit(main())
