"""Generated tokens/s: the kit's rollout (models/generation.py, Megatron-Core's static KV cache) against
transformers' ``generate`` with its KV cache: the same random Qwen3 model, prompts of mixed lengths,
token budget and greedy decoding, measured in the same run. Prints both rates and their ratio
(target >= 1.0x on CPU), and how many rows of the two agree token for token.

  python benchmarks/rollout.py [--model tiny-moe] [--prompts 16] [--new-tokens 64] [--repeats 3]
  python benchmarks/rollout.py --model 0.6B --precision bf16      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _timed(function, repeats: int) -> tuple[float, object]:
    """(best wall time of ``repeats`` runs, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-moe", help="a preset (default tiny-moe: Qwen3's vocabulary)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=(8, 48), metavar=("MIN", "MAX"),
                        help="prompt lengths drawn from [MIN, MAX] (default 8 48)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from megatron_patch.models.generation import Sampling, generate
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.models.qwen3.hf_model import load_hf_model, save_random_hf_checkpoint
    from megatron_patch.models.qwen3.loading import load_hf_weights
    from megatron_patch.models.qwen3.presets import get_preset
    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.patches import apply_patches
    from megatron_patch.patches.warnings import silence_upstream_warnings

    silence_upstream_warnings()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    apply_patches(cpu=not cuda)
    initialize_parallel(ParallelLayout(), backend="nccl" if cuda else "gloo")
    arch = get_preset(args.model)
    generator = torch.Generator().manual_seed(0)
    shortest, longest = args.prompt_lengths
    lengths = torch.randint(shortest, longest + 1, (args.prompts,), generator=generator).tolist()
    prompts = [torch.randint(0, arch.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    with tempfile.TemporaryDirectory() as folder:
        save_random_hf_checkpoint(arch, folder, seed=0)
        reference = load_hf_model(folder, dtype=dtype).to(device)
        ours = build_gpt_model(arch, BuildOptions(precision=args.precision, aux_loss_coeff=0.0))
        load_hf_weights(ours, folder, arch)
        ours = ours.to(device).eval()

    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0)  # no stop token: every row runs to the end
    our_seconds, completions = _timed(lambda: generate(ours, prompts, sampling, arch.vocab_size), args.repeats)

    width = max(lengths)
    padded = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, prompt in enumerate(prompts):  # left padding, as transformers' decoder-only generate wants
        padded[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1

    def hf_generate():
        with torch.no_grad():
            return reference.generate(input_ids=padded.to(device), attention_mask=mask.to(device), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=0, use_cache=True)

    hf_seconds, output = _timed(hf_generate, args.repeats)
    hf_tokens = output[:, width:].tolist()
    agree = sum(c.tokens == t for c, t in zip(completions, hf_tokens))
    generated = len(prompts) * args.new_tokens
    figures = {"model": args.model, "precision": args.precision, "device": device, "prompts": len(prompts),
               "prompt_lengths": [min(lengths), max(lengths)], "new_tokens": args.new_tokens,
               "ours_tokens_per_second": generated / our_seconds, "hf_tokens_per_second": generated / hf_seconds,
               "ratio": hf_seconds / our_seconds, "rows_agreeing": agree}
    print(f"{args.model} {args.precision} on {device}: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} "
          f"tokens, {args.new_tokens} new tokens each, greedy, best of {args.repeats}")
    print(f"  kit's rollout (Megatron-Core KV cache): {figures['ours_tokens_per_second']:,.0f} tokens/s")
    print(f"  transformers generate (KV cache):      {figures['hf_tokens_per_second']:,.0f} tokens/s")
    print(f"  ratio {figures['ratio']:.2f}x (target >= 1.0x); rows token-for-token equal: {agree}/{len(prompts)}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
