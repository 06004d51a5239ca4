"""Training throughput and MFU of a Qwen3-30B-A3B-shaped slice without Transformer-Engine.

One process, one device. The slice keeps the A3B width (hidden 2048, 32 query / 4 KV heads of
128, 128 experts of 768, top-8, the full 151,936-token vocabulary) with --layers layers. In one run:

  1. checks: the GPU-only paths against their references on this device (varlen attention vs the
     per-segment SDPA loop, grouped_mm experts vs SequentialMLP, bf16);
  2. the bf16 matmul peak of this device (an 8192^3 GEMM), the reference for "measured" MFU;
  3. our training step (Megatron-Core DDP + distributed optimizer + schedule; forward, backward,
     optimizer) with --transformer-impl torch, then with the stock local spec;
  4. the same slice and batch through transformers' Qwen3MoeForCausalLM, forward + backward only
     (no optimizer: this favours transformers);
  5. a torch-profiler table of one of our steps.

Timings are --steps steps after --warmup steps. MFU = tokens/s x model FLOPs/token / peak, with
the FLOPs/token formula of docs/benchmarks.md (6 x active matmul parameters + causal attention).

  python benchmarks/train_gpu.py [--layers 2] [--seq-length 4096] [--micro-batch-size 2]
  python benchmarks/train_gpu.py --tiny --device cpu          # the same code on a CPU-sized model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=2,
                        help="A3B layers in the slice (4 may not fit in 80 GB with Adam state)")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--impls", default="torch,local,hf", help="which runs, of torch, local, hf")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized model of the same shape ratios")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args()


def slice_arch(args):
    from megatron_patch.models.qwen3.presets import get_preset

    if args.tiny:
        return get_preset("tiny-moe").replace(
            hidden_size=256, num_layers=args.layers, num_attention_heads=8, num_query_groups=1, head_dim=64,
            ffn_hidden_size=768, moe_ffn_hidden_size=96, num_experts=32, moe_topk=8, vocab_size=4096,
            max_position_embeddings=max(1024, args.seq_length))
    return get_preset("A3B").replace(num_layers=args.layers)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, warmup: int, steps: int, device: str) -> float:
    """Seconds per step, after warm-up."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def matmul_peak_tflops(device: str) -> float:
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = timed(lambda: a @ b, 3, 20 if device == "cuda" else 3, device)
    return 2 * n**3 / seconds / 1e12


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_memory(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def random_batches(arch, args, count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (args.micro_batch_size, args.seq_length + 1)
    return [torch.randint(0, arch.vocab_size, shape, generator=generator) for _ in range(count)]


def check_gpu_paths(device: str) -> dict:
    """Max |difference| of the CUDA-only kernels against their references (bf16)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_patch.models.attention import SdpaAttention, _varlen_attention
    from megatron_patch.models.experts import GroupedGemmExperts, grouped_mm_usable
    from megatron_patch.models.qwen3.builder import BuildOptions, build_transformer_config
    from megatron_patch.models.qwen3.presets import get_preset

    arch = get_preset("tiny-moe").replace(hidden_size=256, num_attention_heads=8, num_query_groups=2, head_dim=64,
                                          moe_ffn_hidden_size=128, num_experts=8, moe_topk=2)
    config = build_transformer_config(arch, BuildOptions(precision="bf16", aux_loss_coeff=0.0),
                                      use_cpu_initialization=device == "cpu")
    groups = ProcessGroupCollection.use_mpu_process_groups()
    results = {"varlen_kernel": _varlen_attention() is not None and device == "cuda"}
    attention = SdpaAttention(config, 1, AttnMaskType.causal, pg_collection=groups)
    cu = torch.tensor([0, 100, 101, 357, 512], dtype=torch.int32, device=device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=256, max_seqlen_kv=256)
    q = torch.randn(512, 8, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(512, 2, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    fast = attention(q, k, v, None, packed_seq_params=params)
    SdpaAttention.use_varlen_kernel = False
    loop = attention(q, k, v, None, packed_seq_params=params)
    SdpaAttention.use_varlen_kernel = True
    results["varlen_vs_loop_max_abs"] = (fast.float() - loop.float()).abs().max().item()

    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    stock = SequentialMLP(8, config, submodules, pg_collection=groups).to(device)
    ours = GroupedGemmExperts(8, config, submodules, pg_collection=groups).to(device)
    ours.load_state_dict(stock.state_dict())
    counts = torch.tensor([40, 0, 7, 100, 33, 1, 64, 11])
    hidden = torch.randn(int(counts.sum()), 256, device=device, dtype=torch.bfloat16)
    probs = torch.rand(int(counts.sum()), device=device)
    results["grouped_mm_kernel"] = grouped_mm_usable(hidden)
    expected, got = stock(hidden, counts, probs)[0], ours(hidden, counts, probs)[0]
    results["grouped_vs_sequential_max_rel"] = ((got.float() - expected.float()).abs().max()
                                                / expected.float().abs().max()).item()
    return results


def planned_memory_gib(arch, args, impl: str) -> float:
    """What the planner (training/memory_plan.py) expects torch.cuda.max_memory_allocated to reach for this run:
    one GPU, the distributed optimizer without overlap (wrap_with_ddp's defaults here), no recompute."""
    from megatron_patch.training.config import TrainConfig
    from megatron_patch.training.memory_plan import plan_memory

    config = TrainConfig(model="A3B", precision="bf16", seq_length=args.seq_length,
                         micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size,
                         overlap_grad_reduce=False, overlap_param_gather=False, data_path=["(benchmark)"])
    return plan_memory(config, arch, impl, world_size=1).allocated / 2**30


def run_ours(arch, args, impl: str, profile: bool) -> dict:
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.training.steps import OptimizerSettings, build_optimizer, lm_batch, train_step, wrap_with_ddp

    reset_memory(args.device)
    model = build_gpt_model(arch, BuildOptions(precision="bf16", transformer_impl=impl, moe_dispatcher="alltoall"))
    if args.device == "cuda":
        model = model.cuda()
    chunks = wrap_with_ddp([model], overlap_grad_reduce=False)
    optimizer = build_optimizer(chunks, OptimizerSettings(lr=1e-5))
    batches = [{k: v.to(args.device) for k, v in lm_batch(t).items()} for t in random_batches(arch, args, 1)]

    def step():
        train_step(chunks, optimizer, iter(batches), 1, args.seq_length, args.micro_batch_size)

    seconds = timed(step, args.warmup, args.steps, args.device)
    result = {"seconds_per_step": seconds, "peak_memory_gib": peak_memory_gib(args.device),
              "planned_memory_gib": planned_memory_gib(arch, args, impl)}
    if result["peak_memory_gib"]:
        result["planned_over_measured"] = result["planned_memory_gib"] / result["peak_memory_gib"]
    if profile:
        result["profile"] = profile_table(step, args.device)
    model = chunks = optimizer = None  # free them before the next measurement (closures hold the names)
    return result


def run_transformers(arch, args) -> dict:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    reset_memory(args.device)
    config = Qwen3MoeConfig(**arch.to_hf_config())
    with torch.device(args.device):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).train()
    tokens = random_batches(arch, args, 1)[0].to(args.device)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()

    seconds = timed(step, args.warmup, args.steps, args.device)
    result = {"seconds_per_step": seconds, "peak_memory_gib": peak_memory_gib(args.device),
              "experts_implementation": getattr(config, "_experts_implementation", None)}
    model = None  # free it before the next measurement (the closure holds the name)
    return result


def profile_table(step, device: str, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def main():
    args = parse_args()
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.patches import apply_patches
    from megatron_patch.training.metrics import device_peak_tflops, model_flops_per_token

    apply_patches(cpu=args.device == "cpu")
    initialize_parallel(ParallelLayout(), backend="gloo" if args.device == "cpu" else "nccl")
    arch = slice_arch(args)
    tokens = args.micro_batch_size * args.seq_length
    flops_per_token = model_flops_per_token(arch, args.seq_length)
    measured_peak = matmul_peak_tflops(args.device)
    datasheet = device_peak_tflops() if args.device == "cuda" else None
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}",
        "torch": torch.__version__, "layers": arch.num_layers, "hidden": arch.hidden_size,
        "experts": arch.num_experts, "topk": arch.moe_topk, "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size, "tokens_per_step": tokens,
        "gflops_per_token": flops_per_token / 1e9, "measured_bf16_peak_tflops": measured_peak,
        "datasheet_bf16_tflops": datasheet, "checks": check_gpu_paths(args.device), "runs": {},
    }
    impls = args.impls.split(",")
    for impl in ("torch", "local"):
        if impl in impls:
            try:
                report["runs"][impl] = run_ours(arch, args, impl, profile=args.profile and impl == "torch")
            except torch.OutOfMemoryError:
                report["runs"][impl] = {"error": "out of memory"}
    if "hf" in impls:
        try:
            report["runs"]["transformers"] = run_transformers(arch, args)
        except torch.OutOfMemoryError:
            report["runs"]["transformers"] = {"error": "out of memory"}
    for run in report["runs"].values():
        if "seconds_per_step" in run:
            run["tokens_per_s"] = tokens / run["seconds_per_step"]
            run["tflops"] = run["tokens_per_s"] * flops_per_token / 1e12
            run["mfu_measured_peak"] = run["tflops"] / measured_peak
            run["mfu_datasheet"] = None if datasheet is None else run["tflops"] / datasheet
    print_report(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


def print_report(report: dict):
    print(f"device {report['device']}, torch {report['torch']}; slice: {report['layers']} layers, hidden "
          f"{report['hidden']}, {report['experts']} experts top-{report['topk']}; {report['micro_batch_size']} x "
          f"{report['seq_length']} tokens per step; {report['gflops_per_token']:.2f} GFLOP/token")
    print(f"bf16 matmul peak measured {report['measured_bf16_peak_tflops']:.3g} TFLOP/s; datasheet "
          f"{report['datasheet_bf16_tflops']}")
    print("checks:", json.dumps(report["checks"]))
    runs = report["runs"]
    for name, run in runs.items():
        if "error" in run:
            print(f"{name:14s} {run['error']}")
            continue
        memory = "" if run["peak_memory_gib"] is None else f" | peak {run['peak_memory_gib']:.1f} GiB"
        if run.get("planned_over_measured"):
            memory += f" (planned {run['planned_memory_gib']:.1f} GiB, {run['planned_over_measured']:.2f}x)"
        datasheet = "" if run["mfu_datasheet"] is None else f" | MFU {run['mfu_datasheet']:.1%} of datasheet"
        print(f"{name:14s} {run['tokens_per_s']:10,.0f} tokens/s | {run['tflops']:7.3g} TFLOP/s | MFU "
              f"{run['mfu_measured_peak']:.1%} of measured peak{datasheet}{memory}")
    ours = runs.get("torch", {}).get("tokens_per_s")
    for other in ("local", "transformers"):
        theirs = runs.get(other, {}).get("tokens_per_s")
        if ours and theirs:
            print(f"ratio torch impl / {other}: {ours / theirs:.2f}x")
    if "profile" in runs.get("torch", {}):
        print("\nprofile of one step (torch impl):\n" + runs["torch"]["profile"])


if __name__ == "__main__":
    main()
