"""One rank of a multi-process check, run as a "check" job of workers/batch.py.

  logits: load the model at the given layout and save the full logits (last stage, first rank).
  train:  a few steps on a fixed batch with DDP + distributed optimizer; save the loss per step.
  train-save: train, then save a checkpoint as the training loop does (model + optimizer +
          iteration, tracker file) under --save-dir and the trained model's logits to --out.
  rollout: sample with the kit's generator (models/generation.py), each data-parallel rank its own
          prompts and token budget; save the largest |rollout - teacher-forced log-prob| of any rank.
  lora:   the base from --torch-dist plus the adapters of the LoRA save --lora-checkpoint, at the
          given layout: save the logits to --out and the adapters again (adapter-only) under --save-dir.
  hf-start: the model loaded by training's load_checkpoint from --hf-dir (straight from safetensors)
          and, into a second model, from --torch-dist; save how many local tensors differ (any rank).
The model comes from --hf-dir, or from a torch_dist checkpoint with --torch-dist.
"""

import argparse
import json

import torch
import torch.distributed as dist


def run(argv=None):
    """One check in this process group (several may run in one launch: workers/batch.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["logits", "train", "train-save", "lora", "rollout", "hf-start"])
    parser.add_argument("--hf-dir", required=True, help="HF dir (weights, or only config.json with --torch-dist)")
    parser.add_argument("--torch-dist", help="load the weights from this torch_dist checkpoint dir instead")
    parser.add_argument("--save-dir", help="train-save: Megatron save dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=1, help="expert TP")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism")
    parser.add_argument("--transformer-impl", default="auto")
    parser.add_argument("--lora-checkpoint", help="lora: the LoRA save whose adapters to load")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dispatcher", default="alltoall")
    args = parser.parse_args(argv)

    from megatron_patch.patches import apply_patches

    apply_patches()
    from megatron.core import parallel_state

    from megatron_patch.models.logits import forward_logits
    from megatron_patch.models.qwen3.arch import Qwen3Arch
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.models.qwen3.loading import load_hf_weights
    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from tests.helpers import train_on_fixed_batch

    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sequence_parallel=args.sp)
    initialize_parallel(layout, seed=1234)
    arch = Qwen3Arch.from_hf_dir(args.hf_dir)
    model = build_gpt_model(arch, BuildOptions(layout=layout, aux_loss_coeff=0.0, moe_dispatcher=args.dispatcher,
                                                   transformer_impl=args.transformer_impl))
    if args.mode == "lora":
        from megatron_patch.checkpoints import checkpoint_info
        from megatron_patch.lora.apply import apply_lora, is_adapter_key
        from megatron_patch.lora.config import LoraSettings
        from megatron_patch.training.checkpointing import load_checkpoint

        saved = checkpoint_info(args.lora_checkpoint)["lora"]
        apply_lora([model], LoraSettings(saved["rank"], saved["alpha"], targets=tuple(saved["targets"])))
        load_checkpoint(args.torch_dist, [model], None, None, load_optim=False, keep=lambda k: not is_adapter_key(k))
        load_checkpoint(args.lora_checkpoint, [model], None, None, load_optim=False, keep=is_adapter_key)
    elif args.mode == "hf-start":
        _hf_start_check(model, arch, args, layout)
        return
    elif args.torch_dist:
        from megatron.core import dist_checkpointing

        state = dist_checkpointing.load(
            sharded_state_dict={"model": model.sharded_state_dict()}, checkpoint_dir=args.torch_dist, strict="raise_all"
        )
        model.load_state_dict(state["model"])
    else:
        load_hf_weights(model, args.hf_dir, arch)
    # Every rank sees the same batch, so every layout computes the same logits.
    tokens = torch.randint(0, arch.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))

    writer = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    writer = writer and parallel_state.get_data_parallel_rank() == 0
    if args.mode in ("logits", "lora"):
        logits = forward_logits(model, tokens[:, :32], vocab_size=arch.vocab_size)
        if writer:
            torch.save(logits, args.out)
        if args.mode == "lora":
            from megatron_patch.training.checkpointing import save_checkpoint

            save_checkpoint(args.save_dir, 1, [model], None, None, 0, save_optim=False, keep=is_adapter_key)
    elif args.mode == "rollout":
        _rollout_check(model, arch.vocab_size, args.out, writer)
    elif args.mode == "train":
        losses, _ = train_on_fixed_batch(model, tokens, steps=args.steps, lr=3e-3)
        if writer:
            with open(args.out, "w") as handle:
                json.dump(losses, handle)
    else:
        _, optimizer = train_on_fixed_batch(model, tokens, steps=args.steps, lr=3e-3)
        from megatron_patch.training.checkpointing import save_checkpoint

        # What the training loop writes: iter_XXXXXXX/ with model and optimizer, then the tracker.
        save_checkpoint(args.save_dir, args.steps, [model], optimizer, scheduler=None, consumed_samples=0)
        logits = forward_logits(model, tokens[:, :32], vocab_size=arch.vocab_size)
        if writer:
            torch.save(logits, args.out)
    dist.barrier()


def _hf_start_check(model, arch, args, layout) -> None:
    """Training's --load of an HF directory against its --load of the converter's output, tensor for tensor."""
    from megatron.core import parallel_state

    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.training.checkpointing import load_checkpoint

    from_torch_dist = build_gpt_model(arch, BuildOptions(layout=layout, aux_loss_coeff=0.0))
    load_checkpoint(args.hf_dir, [model], None, None, load_optim=False, arch=arch)
    load_checkpoint(args.torch_dist, [from_torch_dist], None, None, load_optim=False, arch=arch)
    ours, theirs = model.state_dict(), from_torch_dist.state_dict()
    tensors = [k for k, v in ours.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    counts = torch.tensor([len(tensors), sum(not torch.equal(ours[k], theirs[k]) for k in tensors)])
    dist.all_reduce(counts)
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump({"tensors": int(counts[0]), "different": int(counts[1]),
                       "pipeline_stages": parallel_state.get_pipeline_model_parallel_world_size()}, handle)
    dist.barrier()


def _rollout_check(model, vocab_size: int, out: str, writer: bool) -> None:
    """Data-parallel ranks differ in prompts and budget, so one stops stepping long before the other
    (under EP it must still take part in every forward's token exchange); rank 0 generates two
    sequences at a time, so it also admits prompts (a prefill) while rank 1 only decodes."""
    from megatron.core import parallel_state

    from megatron_patch.models.generation import Sampling
    from tests.helpers import rollout_log_prob_gap

    rank = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(rank)
    lengths, budget = ((3, 8, 13, 21), 24) if rank == 0 else ((30, 5), 6)
    prompts = [torch.randint(2, vocab_size, (n,), generator=generator).tolist() for n in lengths]
    sampling = Sampling(max_new_tokens=budget, temperature=0.9, top_k=100)
    completions, gap = rollout_log_prob_gap(model, vocab_size, prompts, sampling, seed=rank, slots=2)
    totals = torch.tensor([gap, sum(len(c.tokens) for c in completions)], dtype=torch.float64)
    dist.all_reduce(totals[:1], op=dist.ReduceOp.MAX)
    dist.all_reduce(totals[1:])
    if writer:
        with open(out, "w") as handle:
            json.dump({"gap": totals[0].item(), "tokens": int(totals[1])}, handle)
