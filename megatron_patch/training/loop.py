"""The training loop: Megatron-Core model, DDP, optimizer, LR schedule, data, checkpoints, logs.

``train(config)`` runs in every process of a torchrun launch (or alone as a world of one) and
wires stock Megatron-Core pieces the way Megatron-LM's ``pretrain`` does; what is ours is the
settings, the data order, the checkpoint layout and the reporting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patch.training.config import TrainConfig, TrainConfigError


@dataclass
class TrainResult:
    start_iteration: int = 0
    last_iteration: int = 0


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("--device cuda: no CUDA device is visible")
    return choice


def resolve_model(model: str):
    """(Qwen3Arch, HF directory or None) for a preset name or an HF model directory."""
    from megatron_patch.models.qwen3.arch import Qwen3Arch
    from megatron_patch.models.qwen3.presets import get_preset

    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TrainConfigError(f"--model {model}: directory without config.json")
        return Qwen3Arch.from_hf_dir(path), path
    try:
        return get_preset(model), None
    except (KeyError, ValueError) as err:
        raise TrainConfigError(f"--model {model!r}: not a directory and not a preset ({err})") from None


def resolve_tokenizer_dir(config: TrainConfig, hf_dir: Path | None) -> Path:
    from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir

    if config.tokenizer:
        return Path(config.tokenizer)
    for candidate in (hf_dir, Path(config.load) if config.load else None):
        if candidate is not None and (candidate / "tokenizer.json").is_file():
            return candidate
    return bundled_qwen3_tokenizer_dir()


def _layout(config: TrainConfig, arch):
    from megatron_patch.parallel import ParallelLayout

    virtual = None
    if config.num_layers_per_virtual_pipeline_stage:
        per_stage, rest = divmod(arch.num_layers, config.pipeline_model_parallel_size)
        if rest or per_stage % config.num_layers_per_virtual_pipeline_stage:
            raise TrainConfigError(
                f"--num-layers-per-virtual-pipeline-stage {config.num_layers_per_virtual_pipeline_stage} does not "
                f"divide the {arch.num_layers} layers / PP {config.pipeline_model_parallel_size}")
        virtual = per_stage // config.num_layers_per_virtual_pipeline_stage
        virtual = virtual if virtual > 1 else None
    return ParallelLayout(
        tp=config.tensor_model_parallel_size, pp=config.pipeline_model_parallel_size,
        ep=config.expert_model_parallel_size, etp=config.expert_tensor_parallel_size,
        cp=config.context_parallel_size, sequence_parallel=config.sequence_parallel, virtual_pp=virtual,
    )


IMPL_MODULES = {
    "transformer_engine": "Transformer-Engine attention and grouped experts",
    "torch": "SdpaAttention: torch SDPA / varlen attention; GroupedGemmExperts: torch grouped_mm",
    "local": "Megatron-Core DotProductAttention and SequentialMLP",
}


def resolved_transformer_impl(config: TrainConfig) -> str:
    """The --transformer-impl this machine runs ("auto" resolved); a TE request without TE is an error."""
    from megatron_patch.models.qwen3.builder import resolve_transformer_impl, transformer_engine_usable

    if config.transformer_impl == "transformer_engine" and not transformer_engine_usable():
        raise TrainConfigError("--transformer-impl transformer_engine needs Transformer-Engine on CUDA "
                               "(not importable here); use torch or auto")
    return resolve_transformer_impl(config.transformer_impl)


def check_model_fit(config: TrainConfig, arch, impl: str) -> None:
    """Combinations that depend on the model or the machine, named before anything is built."""
    use_te = impl == "transformer_engine"
    pp = config.pipeline_model_parallel_size
    first = config.decoder_first_pipeline_num_layers
    if first is not None:
        if not 0 < first < arch.num_layers or (arch.num_layers - first) % (pp - 1):
            raise TrainConfigError(f"--decoder-first-pipeline-num-layers {first}: the other {arch.num_layers - first} "
                                   f"layers must split evenly over the remaining {pp - 1} pipeline stages")
        if config.num_layers_per_virtual_pipeline_stage:
            raise TrainConfigError("--decoder-first-pipeline-num-layers cannot be combined with virtual pipeline")
    elif arch.num_layers % pp:
        raise TrainConfigError(f"{arch.num_layers} layers are not divisible by --pipeline-model-parallel-size {pp}")
    if arch.num_attention_heads % config.tensor_model_parallel_size or \
            arch.num_query_groups % config.tensor_model_parallel_size:
        raise TrainConfigError(f"--tensor-model-parallel-size {config.tensor_model_parallel_size} does not divide "
                               f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV heads")
    if arch.is_moe:
        if arch.num_experts % config.expert_model_parallel_size:
            raise TrainConfigError(f"--expert-model-parallel-size {config.expert_model_parallel_size} does not divide "
                                   f"{arch.num_experts} experts")
        if config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
            # Megatron-Core's rule: TransformerConfig.__post_init__ (with EP > 1) and MoELayer.forward
            # (0.16.1, any training step) refuse MoE with TP and without SP.
            raise TrainConfigError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (SP=true)")
    elif config.expert_model_parallel_size > 1:
        raise TrainConfigError(f"--expert-model-parallel-size needs an MoE model; {config.model} is dense")
    if config.recompute == "full" and arch.num_layers // pp % config.recompute_num_layers:
        raise TrainConfigError(f"--recompute-num-layers {config.recompute_num_layers} must divide the "
                               f"{arch.num_layers // pp} layers per pipeline stage")
    if not use_te:
        if config.context_parallel_size > 1:
            raise TrainConfigError("--context-parallel-size > 1 needs Transformer-Engine attention (not installed)")
        if config.precision == "fp8":
            raise TrainConfigError("--precision fp8 needs Transformer-Engine (not installed)")
        if config.recompute == "offload":
            raise TrainConfigError("--recompute offload (activation CPU offload) needs Transformer-Engine")
    if config.optimizer_offload_fraction is not None and not torch.cuda.is_available():
        raise TrainConfigError("--optimizer-offload-fraction offloads GPU optimizer state; this run has no GPU")


def _build_model(config: TrainConfig, arch, layout, device: str, impl: str):
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model

    recompute = {"none": None, "sel": "selective", "full": "full", "offload": None}[config.recompute]
    options = BuildOptions(layout=layout, precision="bf16" if config.precision == "fp8" else config.precision,
                           transformer_impl=impl,
                           recompute=recompute, recompute_num_layers=config.recompute_num_layers,
                           aux_loss_coeff=config.moe_aux_loss_coeff)
    overrides = dict(calculate_per_token_loss=True, init_method_std=config.init_method_std)
    if config.decoder_first_pipeline_num_layers is not None:
        overrides["num_layers_in_first_pipeline_stage"] = config.decoder_first_pipeline_num_layers
    if config.recompute == "offload":
        overrides.update(cpu_offloading=True, cpu_offloading_num_layers=config.recompute_num_layers)
    if config.precision == "fp8":
        overrides.update(fp8="hybrid", fp8_recipe="blockwise")
    chunks = [build_gpt_model(arch, options, vp_stage=vp if layout.virtual_pp else None, **overrides)
              for vp in range(layout.virtual_pp or 1)]
    if device == "cuda":
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    return chunks


def _scheduler(config: TrainConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = config.lr_warmup_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else config.lr, max_lr=config.lr, min_lr=config.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(config.resolved_decay_iters(), warmup + 1),
        lr_decay_style=config.lr_decay_style, start_wd=config.weight_decay, end_wd=config.weight_decay,
        wd_incr_steps=config.train_iters, wd_incr_style="constant",
    )


def _is_logging_rank() -> bool:
    """The last pipeline stage's first rank: the one that sees the loss."""
    from megatron.core import parallel_state

    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0)


def _evaluate(chunks, batches_per_eval, valid_iterator, config) -> float | None:
    """Mean per-token validation loss over ``eval_iters`` global batches (last stage; None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.training.steps import lm_forward_step

    for chunk in chunks:
        chunk.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(batches_per_eval):
            micro = valid_iterator.next_global_batch()
            data = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
            seq_length, micro_batch_size = valid_iterator.schedule_shape(config.seq_length)
            reports = get_forward_backward_func()(
                forward_step_func=lm_forward_step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=micro_batch_size,
                forward_only=True,
            )
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                totals += torch.stack([r["lm loss"] for r in reports]).sum(dim=0).double().cpu()
    for chunk in chunks:
        chunk.train()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    device_totals = totals.to("cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(device_totals, group=parallel_state.get_data_parallel_group())
    return (device_totals[0] / device_totals[1].clamp(min=1)).item()


def _iteration_report(config: TrainConfig, iteration: int, step: dict, optimizer, seconds: float, aux: float | None,
                      flops_per_token_per_device: float, peak: float | None) -> tuple[dict, str]:
    """The logged values of one iteration and its console line."""
    tokens_per_second = config.global_batch_size * config.seq_length / seconds
    tflops = tokens_per_second * flops_per_token_per_device / 1e12
    values = {
        "loss": step["loss"], "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": None if step["grad_norm"] is None else float(step["grad_norm"]),
        "tokens_per_second": tokens_per_second, "tflops_per_device": tflops,
        "mfu": None if peak is None else tflops / peak, "aux_loss": aux, "seconds": seconds,
        "skipped": not step["update_successful"],
    }
    line = (f"iteration {iteration:6d}/{config.train_iters} | loss {step['loss']:.6f} | lr {values['lr']:.3e} | "
            f"grad norm {values['grad_norm'] or 0:.3f} | {tokens_per_second:,.0f} tokens/s | "
            f"{tflops:.2f} TFLOP/s/device" + ("" if peak is None else f" | MFU {values['mfu']:.1%}")
            + ("" if aux is None else f" | aux loss {aux:.4f}"))
    return values, line


def _apply_lora(config: TrainConfig, arch, chunks, rank0: bool):
    """Freeze the model, attach the adapters, and say how much is trained."""
    from megatron_patch.lora.apply import apply_lora, trainable_parameter_count
    from megatron_patch.lora.config import LoraSettings

    settings = LoraSettings(config.lora_rank, config.lora_alpha, config.lora_dropout,
                            tuple(config.lora_target_modules), seed=config.seed)
    apply_lora(chunks, settings)
    if rank0:
        trainable = trainable_parameter_count(arch, settings)
        total = arch.parameter_counts()["total"] + trainable
        print(f"LoRA rank {settings.rank}, alpha {settings.alpha:g}, dropout {settings.dropout:g} on "
              f"{' '.join(settings.targets)}: {trainable:,} trainable parameters of {total:,} "
              f"({trainable / total:.3%})", flush=True)
    return settings


def _load(config: TrainConfig, chunks, optimizer, scheduler, lora, rank0: bool):
    """--load (base or full checkpoint) and, for LoRA, --lora-load (adapters, optimizer, position)."""
    from megatron_patch.lora.apply import is_adapter_key
    from megatron_patch.training import checkpointing

    loaded = checkpointing.LoadedState()
    if config.load:
        keep, load_optim = None, config.load_optim
        info = checkpointing.checkpoint_info(config.load)
        if info.get("lora", {}).get("adapters_only"):
            raise checkpointing.CheckpointError(f"--load {config.load}: holds LoRA adapters only; give the base "
                                                "model as --load and this checkpoint as --lora-load")
        if lora is not None and "lora" not in info:
            # A base model (converter output or a full fine-tuning save): its weights, fresh adapters.
            keep, load_optim = (lambda key: not is_adapter_key(key)), False
        loaded = checkpointing.load_checkpoint(config.load, chunks, optimizer, scheduler, load_optim, keep=keep)
        _report_load(loaded, rank0)
    if config.lora_load:
        saved = checkpointing.checkpoint_info(config.lora_load).get("lora")
        if saved is None:
            raise checkpointing.CheckpointError(f"--lora-load {config.lora_load}: not a LoRA checkpoint")
        if {k: saved[k] for k in ("rank", "targets")} != {k: lora.describe()[k] for k in ("rank", "targets")}:
            raise checkpointing.CheckpointError(f"--lora-load {config.lora_load}: adapters of rank {saved['rank']} "
                                                f"on {' '.join(saved['targets'])} do not match this run's")
        loaded = checkpointing.load_checkpoint(config.lora_load, chunks, optimizer, scheduler, config.load_optim,
                                               keep=is_adapter_key)
        _report_load(loaded, rank0)
    return loaded


def _report_load(loaded, rank0: bool) -> None:
    if rank0:
        how = f"resuming at iteration {loaded.iteration}" if loaded.resumed else "weights only, iteration 0"
        print(f"loaded {loaded.source} ({how})", flush=True)


def train(config: TrainConfig) -> TrainResult:
    """Run the training described by ``config`` in this process (one rank of the job)."""
    from megatron.core import parallel_state

    from megatron_patch.data.tokenizer import Qwen3Tokenizer
    from megatron_patch.parallel import initialize_parallel
    from megatron_patch.patches import apply_patches
    from megatron_patch.training import checkpointing
    from megatron_patch.training.data import MicroBatches, build_datasets
    from megatron_patch.training.metrics import (
        ExpertLoad,
        MetricsWriter,
        Stopwatch,
        collect_aux_loss,
        device_peak_tflops,
        model_flops_per_token,
    )
    from megatron_patch.training.steps import (
        OptimizerSettings,
        build_optimizer,
        synchronized_parameters,
        train_step,
        wrap_with_ddp,
    )

    device = resolve_device(config.device)
    arch, hf_dir = resolve_model(config.model)
    impl = resolved_transformer_impl(config)
    check_model_fit(config, arch, impl)
    layout = _layout(config, arch)
    apply_patches(cpu=device == "cpu")
    initialize_parallel(layout, seed=config.seed, backend="gloo" if device == "cpu" else "nccl")
    world = dist.get_world_size()
    config.check(world)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"transformer implementation: {impl} ({IMPL_MODULES[impl]})", flush=True)
    tokenizer_dir = resolve_tokenizer_dir(config, hf_dir)
    tokenizer = Qwen3Tokenizer.from_dir(tokenizer_dir)

    chunks = _build_model(config, arch, layout, device, impl)
    lora = _apply_lora(config, arch, chunks, rank0) if config.lora_rank else None
    ddp_chunks = wrap_with_ddp(chunks, config.use_distributed_optimizer, config.overlap_grad_reduce,
                               config.overlap_param_gather)
    optimizer = build_optimizer(ddp_chunks, OptimizerSettings(
        lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay, adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2, clip_grad=config.clip_grad,
        use_distributed_optimizer=config.use_distributed_optimizer,
        cpu_offload_fraction=config.optimizer_offload_fraction,
    ))
    scheduler = _scheduler(config, optimizer)

    loaded = _load(config, chunks, optimizer, scheduler, lora, rank0)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    train_set, valid_set = build_datasets(config, tokenizer)
    shuffle = config.sft  # GPTDataset (pretraining) is shuffled by Megatron-Core already
    packing = ("mask" if impl == "local" else "thd") if config.sft_packing else "none"
    batches = MicroBatches(train_set, config.global_batch_size, config.micro_batch_size, dp_rank, dp_size,
                           consumed_samples=loaded.consumed_samples, seed=config.seed, shuffle=shuffle,
                           packing=packing, device=device)
    if config.eval_interval and valid_set is None and rank0:
        print("warning: no validation data (the split leaves none); validation is off", flush=True)

    logging_rank = _is_logging_rank()
    writer = MetricsWriter(config.log_dir, config.tensorboard_dir, enabled=logging_rank)
    experts = None
    if arch.is_moe:
        duplicate = 1 if config.sequence_parallel else config.tensor_model_parallel_size
        experts = ExpertLoad(chunks, arch.num_layers, arch.num_experts, duplicate_factor=duplicate)
    flops_per_token = model_flops_per_token(arch, config.seq_length)
    peak = device_peak_tflops(config.peak_tflops)

    result = TrainResult(start_iteration=loaded.iteration, last_iteration=loaded.iteration)
    iteration = loaded.iteration
    stopwatch = Stopwatch()
    unlogged = 0  # iterations since the last report
    while iteration < config.train_iters:
        micro = batches.next_global_batch()
        data = [iter(micro) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(micro)
        step = train_step(ddp_chunks, optimizer, data, len(micro), *batches.schedule_shape(config.seq_length))
        scheduler.step(increment=1)
        iteration += 1
        seconds = stopwatch.lap()
        unlogged += 1
        if iteration % config.log_interval == 0:
            # Collectives: every rank takes part; only the logging rank (last stage) has the loss and writes.
            # Aux loss and expert load are accumulated since the last report and averaged over it.
            aux = collect_aux_loss(len(micro) * unlogged) if arch.is_moe else None
            load = experts.collect() if experts is not None else None
            unlogged = 0
            if logging_rank:
                values, line = _iteration_report(config, iteration, step, optimizer, seconds, aux,
                                                 flops_per_token / world, peak)
                writer.write(iteration, values, load, line)
        if config.eval_interval and valid_set is not None and iteration % config.eval_interval == 0:
            valid_batches = MicroBatches(valid_set, config.global_batch_size, config.micro_batch_size, dp_rank,
                                         dp_size, seed=config.seed, shuffle=False, packing=packing,
                                         device=device)
            valid = _evaluate(ddp_chunks, config.eval_iters, valid_batches, config)
            if logging_rank:
                ppl = math.exp(min(valid, 50))
                writer.write(iteration, {"valid_loss": valid, "valid_ppl": ppl},
                             line=f"validation at iteration {iteration} | loss {valid:.6f} | ppl {ppl:.3f}")
            stopwatch.lap()  # validation is not training time
        last = iteration == config.train_iters
        stop = config.exit_interval is not None and iteration % config.exit_interval == 0
        if config.save and (last or stop or (config.save_interval and iteration % config.save_interval == 0)):
            from megatron_patch.lora.apply import is_adapter_key

            adapters_only = lora is not None and config.save_lora_only
            extra = {"model": config.model, "seq_length": config.seq_length}
            if lora is not None:
                # The base it was trained on, so that export finds it for an adapter-only save.
                base = str(Path(config.load).absolute()) if config.load else None
                extra["lora"] = {**lora.describe(), "adapters_only": adapters_only, "base": base}
            with synchronized_parameters(ddp_chunks):
                path = checkpointing.save_checkpoint(
                    config.save, iteration, chunks, optimizer, scheduler, batches.consumed_samples,
                    save_optim=config.save_optim, side_files_from=None if adapters_only else hf_dir or tokenizer_dir,
                    hf_config=None if adapters_only else arch.to_hf_config(), extra=extra,
                    keep=is_adapter_key if adapters_only else None,
                )
            if rank0:
                print(f"saved {path}", flush=True)
            stopwatch.lap()  # saving is not training time
        result.last_iteration = iteration
        if stop and not last:
            break
    writer.close()
    return result

