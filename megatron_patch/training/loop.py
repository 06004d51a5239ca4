"""The training loop: step, report, validate, save, until the last iteration or an exit interval.

``train(config)`` runs in every process of a torchrun launch (or alone as a world of one).
What the run is made of (model, optimizer, data, loaded state) is built by ``prepare_run``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.training.checkpointing import save_checkpoint
from megatron_patch.training.config import TrainConfig
from megatron_patch.training.metrics import (
    ExpertLoad,
    MetricsWriter,
    Stopwatch,
    collect_aux_loss,
    device_peak_tflops,
    memory_peak_gib,
    model_flops_per_token,
)
from megatron_patch.training.setup import Run, TrainedModel, prepare_run
from megatron_patch.training.steps import lm_forward_step, synchronized_parameters, train_step


@dataclass
class TrainResult:
    start_iteration: int = 0
    last_iteration: int = 0


def _is_logging_rank() -> bool:
    """The last pipeline stage's first rank: the one that sees the loss."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0)


def _chunk_data(chunks, micro):
    """The schedule's data iterator: one per virtual pipeline chunk, or one."""
    return [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)


def _evaluate(run: Run) -> float | None:
    """Mean per-token validation loss over ``eval_iters`` global batches (last stage; None elsewhere)."""
    chunks, batches = run.ddp_chunks, run.validation_batches()
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    for chunk in chunks:
        chunk.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(run.config.eval_iters):
            micro = batches.next_global_batch()
            seq_length, micro_batch_size = batches.schedule_shape(run.config.seq_length)
            reports = get_forward_backward_func()(
                forward_step_func=lm_forward_step, data_iterator=_chunk_data(chunks, micro),
                model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro),
                seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True,
            )
            if last_stage:
                totals += torch.stack([r["lm loss"] for r in reports]).sum(dim=0).double().cpu()
    for chunk in chunks:
        chunk.train()
    if not last_stage:
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
        "skipped": not step["update_successful"], "memory_peak_gib": memory_peak_gib(),
    }
    line = (f"iteration {iteration:6d}/{config.train_iters} | loss {step['loss']:.6f} | lr {values['lr']:.3e} | "
            f"grad norm {values['grad_norm'] or 0:.3f} | {tokens_per_second:,.0f} tokens/s | "
            f"{tflops:.2f} TFLOP/s/device" + ("" if peak is None else f" | MFU {values['mfu']:.1%}")
            + ("" if aux is None else f" | aux loss {aux:.4f}"))
    return values, line


def save_model(model: TrainedModel, iteration: int, consumed_samples: int, extra: dict | None = None,
               final: bool = False) -> None:
    """A checkpoint of ``model`` (its LoRA save policy applied) in --save, with weights in sync; then
    --save-hf / --save-peft from it when they are due (``final``: the run's last save)."""
    config, lora = model.config, model.lora
    adapters_only = lora is not None and lora.adapters_only
    extra = {"model": config.model, "seq_length": config.seq_length, **(extra or {})}
    if lora is not None:
        extra["lora"] = lora.record()
    side_files = None if adapters_only else model.hf_dir or model.tokenizer_dir
    with synchronized_parameters(model.ddp_chunks):
        path = save_checkpoint(
            config.save, iteration, model.chunks, model.optimizer, model.scheduler, consumed_samples,
            save_optim=config.save_optim, side_files_from=side_files,
            hf_config=None if adapters_only else model.arch.to_hf_config(), extra=extra,
            keep=lora.keep() if lora is not None else None,
        )
    if model.rank0:
        print(f"saved {path}", flush=True)
    if model.hf_export is not None and model.hf_export.due(iteration, final):
        model.hf_export.write(path, lora is not None, final)


def finish_outputs(model: TrainedModel, iteration: int) -> None:
    """A rerun of a run whose training is done (resumed at --train-iters) still leaves every output it asks
    for: the HF outputs of the final save, when a kill stopped their write."""
    config = model.config
    if iteration >= config.train_iters and config.save and model.hf_export is not None:
        model.hf_export.catch_up(model.lora is not None)


def train(config: TrainConfig) -> TrainResult:
    """Run the training described by ``config`` in this process (one rank of the job)."""
    run = prepare_run(config)
    arch, batches = run.arch, run.batches
    logging_rank = _is_logging_rank()
    writer = MetricsWriter(config.log_dir, config.tensorboard_dir, enabled=logging_rank)
    experts = None
    if arch.is_moe:
        duplicate = 1 if config.sequence_parallel else config.tensor_model_parallel_size
        experts = ExpertLoad(run.chunks, arch.num_layers, arch.num_experts, duplicate_factor=duplicate)
    flops_per_token_per_device = model_flops_per_token(arch, config.seq_length) / dist.get_world_size()
    peak = device_peak_tflops(config.peak_tflops)

    iteration = run.loaded.iteration
    finish_outputs(run, iteration)
    result = TrainResult(start_iteration=iteration, last_iteration=iteration)
    stopwatch = Stopwatch()
    unlogged = 0  # iterations since the last report
    while iteration < config.train_iters:
        micro = batches.next_global_batch()
        step = train_step(run.ddp_chunks, run.optimizer, _chunk_data(run.ddp_chunks, micro), len(micro),
                          *batches.schedule_shape(config.seq_length))
        run.scheduler.step(increment=1)
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
                values, line = _iteration_report(config, iteration, step, run.optimizer, seconds, aux,
                                                 flops_per_token_per_device, peak)
                writer.write(iteration, values, load, line)
        if config.eval_interval and run.valid_set is not None and iteration % config.eval_interval == 0:
            valid = _evaluate(run)
            if logging_rank:
                ppl = math.exp(min(valid, 50))
                writer.write(iteration, {"valid_loss": valid, "valid_ppl": ppl},
                             line=f"validation at iteration {iteration} | loss {valid:.6f} | ppl {ppl:.3f}")
            stopwatch.lap()  # validation is not training time
        last = iteration == config.train_iters
        stop = config.exit_interval is not None and iteration % config.exit_interval == 0
        if config.save and (last or stop or (config.save_interval and iteration % config.save_interval == 0)):
            save_model(run, iteration, run.batches.consumed_samples, final=last)
            stopwatch.lap()  # saving is not training time
        result.last_iteration = iteration
        if stop and not last:
            break
    writer.close()
    return result
