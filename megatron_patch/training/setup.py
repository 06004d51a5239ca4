"""Build one training process's run: process groups, model (with LoRA), DDP, optimizer, schedule, data, loaded state.

``prepare_run(config)`` wires stock Megatron-Core pieces the way Megatron-LM's ``pretrain``
does; the loop (``training/loop.py``) only steps, reports, validates and saves.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_patch.checkpoints import checkpoint_info, resolve_checkpoint, tracked_iteration
from megatron_patch.data.tokenizer import Qwen3Tokenizer
from megatron_patch.lora.apply import apply_lora, is_adapter_key, trainable_parameter_count
from megatron_patch.lora.checkpoints import (
    AdapterSavePolicy,
    base_load_filter,
    check_adapter_checkpoint,
    is_base_key,
)
from megatron_patch.lora.config import LoraSettings
from megatron_patch.models.activation_offload import offload_activations
from megatron_patch.models.choices import IMPL_MODULES, RECOMPUTE_MODES
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.parallel import ParallelLayout, initialize_parallel
from megatron_patch.patches import apply_patches
from megatron_patch.training.checkpointing import LoadedState, load_checkpoint
from megatron_patch.training.config import TrainConfig, TrainConfigError
from megatron_patch.training.data import MicroBatches, build_datasets
from megatron_patch.training.hf_export import HFExport
from megatron_patch.training.preflight import (
    check_inputs,
    check_run,
    resolve_device,
    resolve_model,
    resolve_tokenizer_dir,
    resolved_transformer_impl,
)
from megatron_patch.training.steps import OptimizerSettings, build_optimizer, wrap_with_ddp


@dataclass
class TrainedModel:
    """The model a run trains, with its DDP wrappers, optimizer and schedule: what SFT, pretraining and
    GRPO share (their data differs)."""

    config: TrainConfig
    arch: Qwen3Arch
    hf_dir: Path | None
    tokenizer_dir: Path
    tokenizer: Qwen3Tokenizer
    device: str
    impl: str
    chunks: list  # the model chunks (one per virtual pipeline stage)
    ddp_chunks: list
    optimizer: object
    scheduler: OptimizerParamScheduler
    lora: AdapterSavePolicy | None
    hf_export: HFExport | None  # --save-hf / --save-peft, written from the saves

    @property
    def rank0(self) -> bool:
        return dist.get_rank() == 0


@dataclass
class Run(TrainedModel):
    loaded: LoadedState
    batches: MicroBatches
    valid_set: object | None
    packing: str  # "none", "mask" (block mask, local spec) or "thd" (flattened, varlen attention)

    def validation_batches(self) -> MicroBatches:
        config = self.config
        return MicroBatches(self.valid_set, config.global_batch_size, config.micro_batch_size,
                            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                            seed=config.seed, shuffle=False, packing=self.packing, device=self.device)


def _build_model(config: TrainConfig, arch: Qwen3Arch, layout: ParallelLayout, device: str, impl: str) -> list:
    options = BuildOptions(layout=layout, precision=config.weights_precision,
                           transformer_impl=impl, recompute=RECOMPUTE_MODES[config.recompute],
                           recompute_num_layers=config.recompute_num_layers, aux_loss_coeff=config.moe_aux_loss_coeff)
    overrides = dict(calculate_per_token_loss=True, init_method_std=config.init_method_std)
    if config.decoder_first_pipeline_num_layers is not None:
        overrides["num_layers_in_first_pipeline_stage"] = config.decoder_first_pipeline_num_layers
    if config.recompute == "offload" and impl == "transformer_engine":
        overrides.update(cpu_offloading=True, cpu_offloading_num_layers=config.recompute_num_layers)
    if config.precision == "fp8":
        overrides.update(fp8="hybrid", fp8_recipe="blockwise")
    chunks = [build_gpt_model(arch, options, vp_stage=vp if layout.virtual_pp else None, **overrides)
              for vp in range(layout.virtual_pp or 1)]
    if device == "cuda":
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    if config.recompute == "offload" and impl != "transformer_engine":  # PyTorch's saved-tensor hooks instead
        offload_activations(chunks, config.recompute_num_layers)
    return chunks


def _scheduler(config: TrainConfig, optimizer) -> OptimizerParamScheduler:
    warmup = config.lr_warmup_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else config.lr, max_lr=config.lr, min_lr=config.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(config.resolved_decay_iters(), warmup + 1),
        lr_decay_style=config.lr_decay_style, start_wd=config.weight_decay, end_wd=config.weight_decay,
        wd_incr_steps=config.train_iters, wd_incr_style="constant",
    )


def _attach_lora(config: TrainConfig, arch: Qwen3Arch, chunks, rank0: bool) -> AdapterSavePolicy:
    """Freeze the model, attach the adapters, and say how much is trained."""
    settings = LoraSettings(config.lora_rank, config.lora_alpha, config.lora_dropout,
                            tuple(config.lora_target_modules), seed=config.seed)
    apply_lora(chunks, settings)
    if rank0:
        trainable = trainable_parameter_count(arch, settings)
        total = arch.parameter_counts()["total"] + trainable
        print(f"LoRA rank {settings.rank}, alpha {settings.alpha:g}, dropout {settings.dropout:g} on "
              f"{' '.join(settings.targets)}: {trainable:,} trainable parameters of {total:,} "
              f"({trainable / total:.3%})", flush=True)
    return AdapterSavePolicy.for_run(settings, config.save_lora_only, config.load)


def _latest_save(config: TrainConfig) -> int | None:
    """The iteration of the latest complete checkpoint in --save (None when it holds none)."""
    if not config.save:
        return None
    iteration = tracked_iteration(config.save)
    if not isinstance(iteration, int):
        return None
    resolve_checkpoint(config.save)  # the tracker names a complete checkpoint, or this says which is not
    return iteration


def _resume_from_save(config: TrainConfig, arch: Qwen3Arch, chunks, optimizer, scheduler,
                      lora: AdapterSavePolicy | None, iteration: int, rank0: bool) -> LoadedState:
    """Continue an interrupted run from its own latest save (the frozen base of adapter-only saves from --load)."""
    if rank0:
        print(f"resuming from {config.save} (iteration {iteration}), the latest complete checkpoint of --save; "
              f"--load {config.load} {'gives the frozen base only' if lora else 'is not read'} "
              "(--no-auto-resume starts over elsewhere)", flush=True)
    if lora is not None and checkpoint_info(config.save).get("lora", {}).get("adapters_only"):
        load_checkpoint(config.load, chunks, None, None, load_optim=False, keep=is_base_key, arch=arch)
        return load_checkpoint(config.save, chunks, optimizer, scheduler, config.load_optim, keep=is_adapter_key)
    return load_checkpoint(config.save, chunks, optimizer, scheduler, config.load_optim)


def _load(config: TrainConfig, arch: Qwen3Arch, chunks, optimizer, scheduler, lora: AdapterSavePolicy | None,
          rank0: bool) -> LoadedState:
    """The run's start: its own latest save (auto-resume), or --load (base or full checkpoint) and,
    for LoRA, --lora-load (adapters, optimizer, position). A start before --save's latest
    iteration is refused: its saves would move the tracker back."""
    latest = _latest_save(config)
    if latest is not None and config.auto_resume:
        loaded = _resume_from_save(config, arch, chunks, optimizer, scheduler, lora, latest, rank0)
    else:
        loaded = LoadedState()
        if config.load:
            keep, may_resume = base_load_filter(config.load, lora.settings if lora else None)
            loaded = load_checkpoint(config.load, chunks, optimizer, scheduler, config.load_optim and may_resume,
                                     keep=keep, arch=arch)
        if config.lora_load:
            check_adapter_checkpoint(config.lora_load, lora.settings)
            loaded = load_checkpoint(config.lora_load, chunks, optimizer, scheduler, config.load_optim,
                                     keep=is_adapter_key)
    _report_load(loaded, rank0)
    if latest is not None and loaded.iteration < latest:
        why = "its checkpoints hold no optimizer state (--no-save-optim) to resume from" if config.auto_resume \
            else "--no-auto-resume starts over"
        raise TrainConfigError(f"--save {config.save} already holds iteration {latest} and this run would start at "
                               f"{loaded.iteration} ({why}); its saves would move the tracker back: choose another "
                               "--save or remove that one")
    return loaded


def _report_load(loaded: LoadedState, rank0: bool) -> None:
    if rank0 and loaded.source:
        how = f"resuming at iteration {loaded.iteration}" if loaded.resumed else "weights only, iteration 0"
        kind = "HF model directory, read from its safetensors" if loaded.hf else "torch_dist checkpoint"
        print(f"loaded {loaded.source} ({kind}; {how})", flush=True)


def prepare_model(config: TrainConfig) -> TrainedModel:
    """Checks, process groups, model (with LoRA), DDP, optimizer and schedule in this process; nothing loaded."""
    device = resolve_device(config.device)
    arch, hf_dir = resolve_model(config.model)
    impl = resolved_transformer_impl(config)
    # torchrun says how many processes there are before the process groups exist.
    layout = check_run(config, arch, impl, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_inputs(config)
    apply_patches(cpu=device == "cpu")
    backend = "gloo" if device == "cpu" else "nccl"
    tokenizer_dir = resolve_tokenizer_dir(config, hf_dir)
    hf_export = None
    if config.save_hf or config.save_peft:  # its template needs the canonical layout's groups
        initialize_parallel(ParallelLayout(), seed=config.seed, backend=backend)
        hf_export = HFExport.prepare(config, arch, hf_dir, tokenizer_dir)
    initialize_parallel(layout, seed=config.seed, backend=backend)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"transformer implementation: {impl} ({IMPL_MODULES[impl]})", flush=True)
    tokenizer = Qwen3Tokenizer.from_dir(tokenizer_dir)

    chunks = _build_model(config, arch, layout, device, impl)
    lora = _attach_lora(config, arch, chunks, rank0) if config.lora_rank else None
    ddp_chunks = wrap_with_ddp(chunks, config.uses_distributed_optimizer, config.overlap_grad_reduce,
                               config.overlap_param_gather)
    optimizer = build_optimizer(ddp_chunks, OptimizerSettings(
        lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay, adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2, clip_grad=config.clip_grad,
        use_distributed_optimizer=config.uses_distributed_optimizer,
        cpu_offload_fraction=config.optimizer_offload_fraction,
    ))
    return TrainedModel(config, arch, hf_dir, tokenizer_dir, tokenizer, device, impl, chunks, ddp_chunks, optimizer,
                        _scheduler(config, optimizer), lora, hf_export)


def load_start(model: TrainedModel) -> LoadedState:
    """The run's start loaded into ``model``: its own latest save, or --load (and --lora-load)."""
    return _load(model.config, model.arch, model.chunks, model.optimizer, model.scheduler, model.lora, model.rank0)


def prepare_run(config: TrainConfig) -> Run:
    """Everything ``train`` needs, in this process (one rank of the job)."""
    model = prepare_model(config)
    loaded = load_start(model)
    train_set, valid_set = build_datasets(config, model.tokenizer)
    packing = ("mask" if model.impl == "local" else "thd") if config.sft_packing else "none"
    batches = MicroBatches(train_set, config.global_batch_size, config.micro_batch_size,
                           parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                           consumed_samples=loaded.consumed_samples, seed=config.seed,
                           shuffle=config.sft,  # GPTDataset (pretraining) is shuffled by Megatron-Core already
                           packing=packing, device=model.device)
    if config.eval_interval and valid_set is None and model.rank0:
        print("warning: no validation data (the split leaves none); validation is off", flush=True)
    parts = {f.name: getattr(model, f.name) for f in dataclasses.fields(TrainedModel)}
    return Run(**parts, loaded=loaded, batches=batches, valid_set=valid_set, packing=packing)
