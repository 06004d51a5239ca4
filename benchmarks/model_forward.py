"""Forward+backward tokens/s of our Megatron-Core Qwen3-MoE vs transformers' Qwen3MoeForCausalLM.

Same weights, same batch, same process. transformers is timed first, before
the CPU runtime patches are applied, so its figure is the bare baseline; ours
includes everything the kit adds (on CPU: the CUDA->CPU redirection).
Prints both rates and their ratio (ours / transformers).

  python benchmarks/model_forward.py [--device cpu|cuda] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from megatron_patch.models.qwen3.presets import get_preset

# A CPU-sized Qwen3-MoE with the real model's shape ratios (head_dim 2x hidden/heads, GQA 8:1, top-8 of 32).
BENCH_ARCH = get_preset("tiny-moe").replace(
    hidden_size=256, num_layers=4, num_attention_heads=8, num_query_groups=1, head_dim=64,
    ffn_hidden_size=768, moe_ffn_hidden_size=96, num_experts=32, moe_topk=8, vocab_size=4096,
    max_position_embeddings=1024,
)


def time_steps(step, warmup: int, steps: int, device: str) -> float:
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    arch = BENCH_ARCH
    tokens = torch.randint(0, arch.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1].to(args.device), tokens[:, 1:].to(args.device)
    tokens_per_step = inputs.numel()

    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint

    with tempfile.TemporaryDirectory() as hf_dir:
        hf_model = save_random_hf_checkpoint(arch, hf_dir).to(device=args.device, dtype=dtype).train()

        def hf_step():
            hf_model.zero_grad(set_to_none=True)
            hf_model(input_ids=inputs, labels=labels).loss.backward()

        hf_seconds = time_steps(hf_step, 1, args.steps, args.device)
        hf_model = None  # frees the model before the next measurement (the closure holds the name)

        from megatron_patch.patches import apply_patches

        apply_patches()
        from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
        from megatron_patch.models.qwen3.loading import load_hf_weights
        from megatron_patch.parallel import ParallelLayout, initialize_parallel

        initialize_parallel(ParallelLayout())
        model = build_gpt_model(arch, BuildOptions(precision=args.precision))
        load_hf_weights(model, hf_dir, arch)
        model.train()
        position_ids = torch.arange(args.seq, device=args.device).unsqueeze(0).expand_as(inputs)

        def our_step():
            model.zero_grad(set_to_none=True)
            losses = model(input_ids=inputs, position_ids=position_ids, attention_mask=None, labels=labels)
            losses.float().mean().backward()

        our_seconds = time_steps(our_step, 1, args.steps, args.device)

    cpu_name = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name
    print(f"device: {device_name}; torch {torch.__version__}; {args.precision}; batch {args.batch} x seq {args.seq}")
    print(f"model: hidden {arch.hidden_size}, {arch.num_layers} layers, {arch.num_experts} experts top-{arch.moe_topk}")
    print(f"transformers  {tokens_per_step / hf_seconds:10.0f} tokens/s  ({hf_seconds * 1e3:.0f} ms/step)")
    print(f"megatron_patch{tokens_per_step / our_seconds:10.0f} tokens/s  ({our_seconds * 1e3:.0f} ms/step)")
    print(f"ratio (ours / transformers): {hf_seconds / our_seconds:.2f}x")


if __name__ == "__main__":
    main()
