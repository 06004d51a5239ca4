"""Show a Qwen3 model: parameter counts and the Megatron-Core settings the kit uses for it.

  python -m megatron_patch.models.qwen3 A3B
  python -m megatron_patch.models.qwen3 /path/to/hf/model --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_patch.models.qwen3.arch import ConfigError, Qwen3Arch, padded_vocab_size
from megatron_patch.models.qwen3.builder import build_transformer_config
from megatron_patch.models.qwen3.presets import PRESETS, get_preset
from megatron_patch.patches.warnings import silence_upstream_warnings


def resolve_arch(model: str) -> Qwen3Arch:
    """A preset name, or an HF model directory holding config.json."""
    if Path(model).is_dir():
        return Qwen3Arch.from_hf_dir(model)
    return get_preset(model)


def describe(arch: Qwen3Arch) -> dict:
    config = build_transformer_config(arch)
    keys = ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "ffn_hidden_size", "normalization", "layernorm_epsilon", "qk_layernorm", "gated_linear_unit",
            "add_bias_linear", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
            "moe_router_pre_softmax", "moe_aux_loss_coeff", "moe_layer_freq"]
    return {
        "architecture": arch.architecture,
        "parameters": arch.parameter_counts(),
        "padded_vocab_size": padded_vocab_size(arch.vocab_size),
        "rotary_base": arch.rope_theta,
        "tied_embeddings": arch.tie_word_embeddings,
        "transformer_config": {k: getattr(config, k) for k in keys},
    }


def main(argv=None) -> int:
    silence_upstream_warnings()
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.models.qwen3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or an HF model directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        info = describe(resolve_arch(args.model))
    except (ConfigError, KeyError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params = info.pop("parameters")
    print(f"{args.model}: {info.pop('architecture')}")
    print(f"  parameters       {params['total']:,} total, {params['active']:,} active per token")
    for key, value in info.pop("transformer_config").items():
        print(f"  {key:<24} {value}")
    for key, value in info.items():
        print(f"  {key:<24} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
