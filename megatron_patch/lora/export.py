"""The LoRA export job: find the adapters, their base and the model config; write and optionally verify."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.checkpoints import resolve_checkpoint
from megatron_patch.convert.config import ConvertConfig
from megatron_patch.convert.run import megatron_to_hf, resolve_arch, verify_memory_shortfall
from megatron_patch.lora.adapter_checkpoint import AdapterCheckpoint, ExportError, build_model_with_adapters
from megatron_patch.lora.peft_adapter import peft_logits, write_peft_adapter
from megatron_patch.models.choices import PRECISIONS
from megatron_patch.models.logits import forward_logits
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.parity import compare_with_transformers, probe_tokens
from megatron_patch.parallel import ParallelLayout, initialize_parallel

PEFT_TOLERANCE = 1e-4  # fp32 logits, PEFT on the HF base vs the Megatron model with adapters


@dataclass(frozen=True)
class ExportSettings:
    adapter: Path
    iteration: str | None = None
    merged_out: Path | None = None
    peft_out: Path | None = None
    base: Path | None = None
    hf_dir: Path | None = None
    precision: str = "bf16"
    max_shard_bytes: int = 5 << 30
    force: bool = False
    verify: bool = False


def base_checkpoint(settings: ExportSettings, adapters: AdapterCheckpoint) -> Path | None:
    """Where the base weights are: --base, the LoRA save itself (full saves), or the recorded --load."""
    if settings.base is not None:
        base = settings.base
    elif not adapters.adapters_only:
        return adapters.path
    elif adapters.base is not None:
        base = adapters.base
    else:
        return None
    if not base.exists():
        raise ExportError(f"base checkpoint {base} does not exist; pass the torch_dist base model as --base")
    return base


def _converter_config(settings: ExportSettings, load_dir: Path, save_dir: Path) -> ConvertConfig:
    return ConvertConfig(load_dir=load_dir, save_dir=save_dir, mg2hf=True, hf_dir=settings.hf_dir,
                         precision=settings.precision, max_shard_bytes=settings.max_shard_bytes, force=settings.force)


def export(settings: ExportSettings) -> None:
    initialize_parallel(ParallelLayout())  # one process; the converter and model building need the groups
    adapters = AdapterCheckpoint.open(resolve_checkpoint(settings.adapter, settings.iteration).path)
    base = base_checkpoint(settings, adapters)
    if settings.merged_out is not None and base is None:
        raise ExportError(f"{adapters.path} holds adapters only and records no base model; "
                          "pass the torch_dist base model as --base")
    where = base if base is not None else adapters.path
    if settings.hf_dir is None and not any((d / "config.json").is_file() for d in (where, where.parent)):
        raise ExportError(f"no config.json beside {where}; pass the HF base model directory as --hf-dir")
    arch, config_dir = resolve_arch(_converter_config(settings, where, settings.merged_out or settings.peft_out))
    print(f"adapters: {adapters.path} (rank {adapters.settings.rank}, alpha {adapters.settings.alpha:g} on "
          f"{' '.join(adapters.settings.targets)}); base: {base or 'none'}")
    if settings.merged_out is not None:
        config = _converter_config(settings, base, settings.merged_out)
        megatron_to_hf(config, arch, config_dir, delta=lambda address: adapters.delta(address, arch))
        print(f"merged model: {settings.merged_out}")
    if settings.peft_out is not None:
        write_peft_adapter(arch, adapters, settings.peft_out, PRECISIONS[settings.precision],
                           base_model=str(settings.hf_dir) if settings.hf_dir else None, force=settings.force)
        print(f"PEFT adapter: {settings.peft_out}")
    if settings.verify:
        verify(settings, arch, adapters, base)


def verify(settings: ExportSettings, arch: Qwen3Arch, adapters: AdapterCheckpoint, base: Path | None) -> None:
    """Logits of each output against the Megatron model with the adapters; raises ExportError on a mismatch."""
    shortfall = verify_memory_shortfall(arch)
    if base is None or shortfall:
        print(f"verify: skipped ({shortfall or 'no base model'})")
        return
    tokens = probe_tokens(arch)
    if settings.merged_out is not None:
        model = build_model_with_adapters(arch, base, adapters, settings.precision)
        result = compare_with_transformers(arch, settings.merged_out, tokens, settings.precision, model_chunks=model)
        print(f"verify merged: {result}")
        if not result.passed:
            raise ExportError(f"verify failed for {settings.merged_out}: {result}")
    if settings.peft_out is not None:
        has_weights = settings.hf_dir is not None and any(settings.hf_dir.glob("*.safetensors"))
        if settings.precision != "fp32" or not has_weights:
            why = "needs --precision fp32" if has_weights else "needs the HF base model as --hf-dir"
            print(f"verify PEFT: skipped ({why})")
            return
        model = build_model_with_adapters(arch, base, adapters, "fp32")
        ours = forward_logits([model], tokens, vocab_size=arch.vocab_size).float()
        logits, unapplied = peft_logits(settings.hf_dir, settings.peft_out, tokens)
        if unapplied:  # whatever the logits say: an adapter still near zero would hide this
            raise ExportError(f"verify failed for {settings.peft_out}: peft did not apply {len(unapplied)} of its "
                              f"adapters, e.g. on {unapplied[0]}")
        difference = (logits - ours).abs().max().item()
        print(f"verify PEFT: fp32: max |dlogits| = {difference:.2e} (limit {PEFT_TOLERANCE:g})")
        if difference > PEFT_TOLERANCE:
            raise ExportError(f"verify failed for {settings.peft_out}: max |dlogits| = {difference:.2e} "
                              f"(is {settings.hf_dir} the base model the adapters were trained on?)")
