"""Will this run fit, how fast will it go, and which layout is best: before anything launches.

  python -m megatron_patch.plan A3B --gpus 16 --gpu h100 --seq-length 4096 --global-batch-size 1024
  python -m megatron_patch.plan A3B --gpus 8 --gpu h800 --mode grpo --tp 4 --ep 8 --ac full ...

Every layout the launcher would accept is planned: per-GPU memory by part (exact static memory,
activations of the micro-batches in flight, logits, GRPO's KV cache) and an estimated step time.
The table ranks them (layouts that fit first, then tokens/s/GPU); the best one's memory and time by
part and its ``run_mcore_qwen3.sh`` command line follow. Formulas and assumptions: docs/planner.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

from megatron_patch.errors import InputError
from megatron_patch.models.choices import RECOMPUTE_MODES, TRAINING_PRECISIONS
from megatron_patch.plan.cluster import GPU_KINDS, Cluster
from megatron_patch.plan.search import MODES, Candidate, PlanError, Request, search
from megatron_patch.rl.config import GrpoSettings
from megatron_patch.training.launch import POSITIONALS
from megatron_patch.training.memory_plan import GIB
from megatron_patch.training.preflight import resolve_model
from megatron_patch.units import parse_size

IMPLS = ("torch", "local", "transformer_engine")


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _offload(text: str) -> float | str:
    if text.lower() == "false":
        return "off"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected false or a fraction in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_patch.plan",
        description="Per-GPU memory and estimated speed of every layout run_mcore_qwen3.sh would accept for a "
                    "model on a cluster, the best one's command line. Fix any setting to search the rest.")
    parser.add_argument("model", metavar="MODEL_SIZE", help="preset (0.6B ... 32B, A3B, A22B, tiny-moe, tiny-dense) "
                                                            "or an HF model directory")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    parser.add_argument("--gpu", choices=sorted(GPU_KINDS), default="h100",
                        help="GPU kind: its memory, peak TFLOP/s and bandwidths (default: h100)")
    parser.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB (default: the kind's)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs joined by NVLink (default: 8)")
    parser.add_argument("--seq-length", type=int, required=True, help="SEQ_LEN")
    parser.add_argument("--global-batch-size", type=int, required=True,
                        help="GLOBAL_BATCH_SIZE: sequences per step (GRPO: prompts per step)")
    parser.add_argument("--micro-batch-size", type=int, help="BATCH_SIZE (default: search 1, 2, 4)")
    parser.add_argument("--precision", choices=TRAINING_PRECISIONS, default="bf16", help="PR (default: bf16)")
    parser.add_argument("--mode", choices=MODES, default="sft",
                        help="pretrain, sft (full fine-tuning), lora or grpo (default: sft)")
    parser.add_argument("--lora-rank", type=int, help="MP_LORA_RANK: --mode lora (default: 8), or LoRA GRPO")
    parser.add_argument("--transformer-impl", choices=IMPLS, default="torch",
                        help="MP_TRANSFORMER_IMPL the run will use (default: torch, what runs without "
                             "Transformer-Engine)")
    fixed = parser.add_argument_group("fixed settings (each searched when not given)")
    for name, kind, text in (("tp", int, "TP"), ("pp", int, "PP"), ("vp", int, "MP_VP: layers per virtual stage"),
                             ("cp", int, "CP"), ("ep", int, "EP"), ("etp", int, "ETP"), ("sp", _bool, "SP"),
                             ("do", _bool, "DO: the distributed optimizer"),
                             ("optimizer-offload", _offload, "OPTIMIZER_OFFLOAD: false or a fraction")):
        fixed.add_argument(f"--{name}", type=kind, help=text)
    fixed.add_argument("--ac", choices=tuple(RECOMPUTE_MODES), help="AC: activation recompute")
    grpo = parser.add_argument_group("GRPO (--mode grpo)")
    grpo.add_argument("--samples-per-prompt", type=int, default=8, help="MP_GRPO_N (default: 8)")
    grpo.add_argument("--max-prompt-length", type=int, default=512, help="MP_GRPO_MAX_PROMPT_LENGTH (default: 512)")
    grpo.add_argument("--max-response-length", type=int, default=512,
                      help="MP_GRPO_MAX_RESPONSE_LENGTH (default: 512)")
    grpo.add_argument("--kl-coef", type=float, default=0.001, help="MP_GRPO_KL_COEF (default: 0.001)")
    grpo.add_argument("--log-prob-chunk", type=int, default=1024,
                      help="tokens per chunk of the fp32 log-prob computation (default: 1024)")
    grpo.add_argument("--rollout-batch", type=int, default=0,
                      help="MP_GRPO_ROLLOUT_BATCH: sequences a rank generates at once (default: 0, all)")
    model = parser.add_argument_group("machine model (docs/planner.md)")
    model.add_argument("--efficiency", type=float, default=0.4,
                       help="share of peak TFLOP/s the GEMMs reach (default: 0.4)")
    model.add_argument("--headroom", type=float, default=0.05,
                       help="share of GPU memory kept free for the allocator's fragmentation (default: 0.05)")
    model.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s (default: the kind's bf16)")
    model.add_argument("--nvlink-gbps", type=float, help="GB/s per GPU within a node (default: the kind's)")
    model.add_argument("--network-gbps", type=float, help="GB/s per GPU between nodes (default: the kind's)")
    parser.add_argument("--top", type=int, default=10, help="table rows (default: 10)")
    parser.add_argument("--json", action="store_true", help="print every planned layout as JSON")
    return parser


def _request(args) -> Request:
    try:
        arch, _ = resolve_model(args.model)
    except InputError as err:
        raise PlanError(str(err).replace("--model", "MODEL_SIZE")) from None
    for name in ("gpus", "gpus_per_node", "seq_length", "global_batch_size", "micro_batch_size", "top"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 < args.efficiency <= 1 or not 0 <= args.headroom < 1:
        raise PlanError(f"--efficiency {args.efficiency} must be in (0, 1] and --headroom {args.headroom} in [0, 1)")
    cluster = Cluster.of_kind(args.gpu, args.gpus, args.gpus_per_node, args.efficiency, args.headroom)
    overrides = {name: getattr(args, name) for name in ("peak_tflops", "nvlink_gbps", "network_gbps")
                 if getattr(args, name) is not None}
    if args.gpu_memory is not None:
        try:
            overrides["memory"] = parse_size(args.gpu_memory)
        except argparse.ArgumentTypeError as err:
            raise PlanError(f"--gpu-memory: {err}") from None
    cluster = dataclasses.replace(cluster, **overrides)
    fixed = {name: getattr(args, name) for name in ("tp", "pp", "cp", "ep", "etp", "sp", "do", "ac")
             if getattr(args, name) is not None}
    if args.vp is not None:
        fixed["vp"] = args.vp
    if args.optimizer_offload is not None:
        fixed["optimizer_offload"] = None if args.optimizer_offload == "off" else args.optimizer_offload
    if args.micro_batch_size is not None:
        fixed["micro_batch_size"] = args.micro_batch_size
    lora = args.lora_rank or (8 if args.mode == "lora" else 0)
    if lora and args.mode not in ("lora", "grpo"):
        raise PlanError(f"--lora-rank {lora} needs --mode lora (or grpo)")
    grpo = None
    if args.mode == "grpo":
        grpo = GrpoSettings(samples_per_prompt=args.samples_per_prompt, max_prompt_length=args.max_prompt_length,
                            max_response_length=args.max_response_length, kl_coef=args.kl_coef,
                            log_prob_chunk=args.log_prob_chunk, rollout_batch=args.rollout_batch,
                            reward="letters")
    return Request(args.model, arch, cluster, args.seq_length, args.global_batch_size, args.mode, args.precision,
                   args.transformer_impl, lora, fixed, grpo)


def layout_label(config) -> dict:
    return {"TP": config.tensor_model_parallel_size, "PP": config.pipeline_model_parallel_size,
            "VP": config.num_layers_per_virtual_pipeline_stage or "-", "CP": config.context_parallel_size,
            "EP": config.expert_model_parallel_size, "ETP": config.expert_tensor_parallel_size,
            "SP": "on" if config.sequence_parallel else "off", "AC": config.recompute,
            "DO": "on" if config.use_distributed_optimizer else "off",
            "OFFLOAD": "-" if config.optimizer_offload_fraction is None else f"{config.optimizer_offload_fraction:g}",
            "MBS": config.micro_batch_size}


def command_line(request: Request, config) -> str:
    """The run_mcore_qwen3.sh (or _grpo.sh) line of ``config``; paths and schedule are the user's to fill in."""
    cluster = request.cluster
    env = {"MP_TRANSFORMER_IMPL": request.impl}
    if config.num_layers_per_virtual_pipeline_stage:
        env["MP_VP"] = config.num_layers_per_virtual_pipeline_stage
    if config.lora_rank:
        env["MP_LORA_RANK"] = config.lora_rank
    script = "run_mcore_qwen3.sh"
    if request.grpo is not None:
        script = "run_mcore_qwen3_grpo.sh"
        env.update(MP_GRPO_N=request.grpo.samples_per_prompt, MP_GRPO_MAX_PROMPT_LENGTH=request.grpo.max_prompt_length,
                   MP_GRPO_MAX_RESPONSE_LENGTH=request.grpo.max_response_length, MP_GRPO_KL_COEF=request.grpo.kl_coef)
        if request.grpo.log_prob_chunk != GrpoSettings.log_prob_chunk:
            env["MP_GRPO_LOG_PROB_CHUNK"] = request.grpo.log_prob_chunk
        if request.grpo.rollout_batch:
            env["MP_GRPO_ROLLOUT_BATCH"] = request.grpo.rollout_batch
    values = dict(
        ENV="dsw" if cluster.gpus <= cluster.gpus_per_node else "dlc", MODEL_SIZE=request.model,
        BATCH_SIZE=config.micro_batch_size, GLOBAL_BATCH_SIZE=config.global_batch_size, LR="1e-5", MIN_LR="1e-6",
        SEQ_LEN=config.seq_length, PAD_LEN=config.seq_length, PR=config.precision,
        TP=config.tensor_model_parallel_size, PP=config.pipeline_model_parallel_size,
        CP=config.context_parallel_size, ETP=config.expert_tensor_parallel_size,
        EP=config.expert_model_parallel_size, SP=str(config.sequence_parallel).lower(),
        DO=str(config.use_distributed_optimizer).lower(), FL="true", SFT=str(request.mode != "pretrain").lower(),
        AC="false" if config.recompute == "none" else config.recompute,
        OPTIMIZER_OFFLOAD="false" if config.optimizer_offload_fraction is None
        else f"{config.optimizer_offload_fraction:g}", SAVE_INTERVAL=1000)
    # Paths and the schedule are the user's: their names stand in.
    arguments = [values.get(name, name) for name in POSITIONALS]
    settings = " ".join(f"{name}={value}" for name, value in env.items())
    return f"{settings} bash examples/qwen3/{script} {shlex.join(str(a) for a in arguments)}"


def _table(candidates: list[Candidate], request: Request, top: int) -> list[str]:
    columns = list(layout_label(candidates[0].config)) + ["peak GiB", "fits", "tokens/s/GPU", "step s"]
    rows = []
    for candidate in candidates[:top]:
        label = layout_label(candidate.config)
        rows.append([*map(str, label.values()), f"{candidate.memory.peak / GIB:.1f}",
                     "yes" if candidate.fits else "no",
                     f"{candidate.tokens_per_gpu_second(request.cluster.gpus):,.0f}",
                     f"{candidate.time.seconds:.2f}"])
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    return ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in [columns, *rows]]


def _as_json(candidate: Candidate, request: Request) -> dict:
    return {"layout": layout_label(candidate.config), "fits": candidate.fits, "phase": candidate.memory.phase,
            "peak_bytes": candidate.memory.peak, "allocated_bytes": candidate.memory.allocated,
            "pipeline_stage": candidate.memory.stage, "memory_bytes": candidate.memory.parts,
            "host_bytes": candidate.memory.host, "step_seconds": candidate.time.parts,
            "tokens_per_gpu_second": candidate.tokens_per_gpu_second(request.cluster.gpus),
            "command": command_line(request, candidate.config)}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        request = _request(args)
        candidates, refusal = search(request)
        if not candidates:
            raise PlanError(f"no layout of {request.model} on {request.cluster.gpus} GPUs is accepted: {refusal}")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cluster = request.cluster
    if args.json:
        print(json.dumps({"gpu": cluster.kind, "gpus": cluster.gpus, "gpu_memory_bytes": cluster.memory,
                          "usable_bytes": cluster.usable_memory,
                          "layouts": [_as_json(c, request) for c in candidates]}, indent=1))
        return 0 if candidates[0].fits else 1
    fitting = sum(c.fits for c in candidates)
    print(f"{request.model} {request.mode} on {cluster.gpus} x {cluster.kind} ({cluster.memory / GIB:.1f} GiB, "
          f"{cluster.usable_memory / GIB:.1f} usable): {len(candidates)} layouts accepted, {fitting} fit")
    print("\n".join(_table(candidates, request, args.top)))
    best = candidates[0]
    print(f"\n{'best' if best.fits else 'closest (does not fit)'}: memory per GPU")
    print("\n".join(best.memory.lines()))
    print("step time: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in best.time.parts.items()))
    print(("\n" if best.fits else "\nnothing fits; the closest layout: ") + command_line(request, best.config))
    return 0 if best.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
