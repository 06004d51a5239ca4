"""`make demo`: the kit end to end on the embedded default (tiny Qwen3-MoE, CPU).

Stages so far:
1. write a random tiny Qwen3-MoE HF checkpoint (transformers, no download);
2. build the same model on Megatron-Core and load the checkpoint through the weight mapping;
3. check Megatron's logits against transformers';
4. train a few steps with Megatron's DDP, distributed optimizer and pipeline schedule.
Later issues extend this to convert -> SFT -> convert -> evaluate.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="tiny-moe", help="a preset name (default: tiny-moe)")
    parser.add_argument("--steps", type=int, default=8, help="training steps in stage 4")
    args = parser.parse_args(argv)

    from megatron_patch.patches import apply_patches

    apply_patches()
    from megatron_patch.models.logits import forward_logits
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
    from megatron_patch.models.qwen3.loading import load_hf_weights
    from megatron_patch.models.qwen3.presets import get_preset
    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.training.steps import train_on_fixed_batch

    arch = get_preset(args.model_size)
    counts = arch.parameter_counts()
    print(f"[demo] model {args.model_size}: {counts['total']:,} parameters, {counts['active']:,} active per token")
    initialize_parallel(ParallelLayout(), seed=1234)
    with tempfile.TemporaryDirectory(prefix="megatron_patch-demo-") as hf_dir:
        started = time.perf_counter()
        hf_model = save_random_hf_checkpoint(arch, hf_dir)
        print(f"[demo] 1. random HF checkpoint written to {hf_dir}")
        model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0))
        shards = load_hf_weights(model, hf_dir)
        print(f"[demo] 2. Megatron-Core GPTModel built, {shards} tensors loaded through the mapping")
        tokens = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        ours = forward_logits(model, tokens, vocab_size=arch.vocab_size)
        with torch.no_grad():
            reference = hf_model(input_ids=tokens).logits
        delta = (ours - reference).abs().max().item()
        print(f"[demo] 3. max |logits(Megatron) - logits(transformers)| = {delta:.2e} (fp32)")
        if delta > 1e-4:
            print("[demo] FAILED: logits differ")
            return 1
        losses, _ = train_on_fixed_batch(model, tokens, steps=args.steps, lr=3e-3)
        print(f"[demo] 4. {args.steps} training steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        print(f"[demo] done in {time.perf_counter() - started:.1f}s")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
