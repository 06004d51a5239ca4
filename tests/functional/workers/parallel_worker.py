"""One rank of a multi-process check, started by torchrun from tests/functional.

  logits: load an HF checkpoint at the given layout and save the full logits (last stage, first rank).
  train:  a few steps on a fixed batch with DDP + distributed optimizer; save the loss per step.
"""

import argparse
import json

import torch
import torch.distributed as dist


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["logits", "train"])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dispatcher", default="alltoall")
    args = parser.parse_args()

    from megatron_patch.patches import apply_patches

    apply_patches()
    from megatron.core import parallel_state

    from megatron_patch.models.logits import forward_logits
    from megatron_patch.models.qwen3.arch import Qwen3Arch
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.models.qwen3.loading import load_hf_weights
    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.training.steps import train_on_fixed_batch

    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep)
    initialize_parallel(layout, seed=1234)
    arch = Qwen3Arch.from_hf_dir(args.hf_dir)
    model = build_gpt_model(arch, BuildOptions(layout=layout, aux_loss_coeff=0.0, moe_dispatcher=args.dispatcher))
    load_hf_weights(model, args.hf_dir, arch)
    # Every rank sees the same batch, so every layout computes the same logits.
    tokens = torch.randint(0, arch.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))

    writer = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    writer = writer and parallel_state.get_data_parallel_rank() == 0
    if args.mode == "logits":
        logits = forward_logits(model, tokens[:, :32], vocab_size=arch.vocab_size)
        if writer:
            torch.save(logits, args.out)
    else:
        losses = train_on_fixed_batch(model, tokens, steps=args.steps, lr=3e-3)
        if writer:
            with open(args.out, "w") as handle:
                json.dump(losses, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
