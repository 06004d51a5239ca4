"""Logits parity of our Megatron-Core Qwen3 with transformers, on any device and precision.

Prints, per configuration, the max |dlogits| against transformers in fp32 and
(for bf16) transformers' own bf16 error, with the pass rule of
``megatron_patch.models.qwen3.parity``. Used for the GPU row of docs/benchmarks.md:

  python benchmarks/parity.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from megatron_patch.models.qwen3.presets import get_preset

CONFIGS = {
    "moe-gqa": get_preset("tiny-moe"),
    "moe-mqa-mixed-tied": get_preset("tiny-moe").replace(
        num_query_groups=1, norm_topk_prob=False, dense_layers=(1,), tie_word_embeddings=True, vocab_size=500
    ),
    "dense": get_preset("tiny-dense"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    from megatron_patch.patches import apply_patches

    apply_patches()
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
    from megatron_patch.models.qwen3.parity import compare_with_transformers
    from megatron_patch.parallel import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout())
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device}; torch {torch.__version__}")
    failures = 0
    for name, arch in CONFIGS.items():
        with tempfile.TemporaryDirectory() as hf_dir:
            save_random_hf_checkpoint(arch, hf_dir, seed=0)
            tokens = torch.randint(0, arch.vocab_size, (2, args.seq), generator=torch.Generator().manual_seed(0))
            for precision in args.precision:
                result = compare_with_transformers(arch, hf_dir, tokens, precision, device=args.device)
                failures += not result.passed
                print(f"{name:<20} {result}  {'PASS' if result.passed else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
