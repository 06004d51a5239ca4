"""Everything decided and checked before a training process builds anything.

The launcher runs the same functions before torchrun starts, so a bad combination is named
once, in Pai's argument names, instead of in every worker.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_patch.checkpoints import (
    CheckpointError,
    check_hf_model,
    is_hf_model_dir,
    resolve_checkpoint,
    tracked_iteration,
)
from megatron_patch.checkpoints.staging import check_replaceable
from megatron_patch.data.build_sft import MASK_SUFFIX
from megatron_patch.data.indexed import IndexedDatasetError, check_indexed_dataset
from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
from megatron_patch.models.choices import resolve_transformer_impl, transformer_engine_usable
from megatron_patch.models.layout_check import layout_problems
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.presets import get_preset
from megatron_patch.outputs import OutputError, check_writable
from megatron_patch.parallel import ParallelLayout
from megatron_patch.training.config import TrainConfig, TrainConfigError
from megatron_patch.training.data import DataConfigError, weighted_prefixes


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("--device cuda: no CUDA device is visible")
    return choice


def resolve_model(model: str) -> tuple[Qwen3Arch, Path | None]:
    """(Qwen3Arch, HF directory or None) for a preset name or an HF model directory."""
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
    if config.tokenizer:
        return Path(config.tokenizer)
    for candidate in (hf_dir, Path(config.load) if config.load else None):
        if candidate is not None and (candidate / "tokenizer.json").is_file():
            return candidate
    return bundled_qwen3_tokenizer_dir()


def resolved_transformer_impl(config: TrainConfig) -> str:
    """The --transformer-impl this machine runs ("auto" resolved); a TE request without TE is an error."""
    if config.transformer_impl == "transformer_engine" and not transformer_engine_usable():
        raise TrainConfigError("--transformer-impl transformer_engine needs Transformer-Engine on CUDA "
                               "(not importable here); use torch or auto")
    return resolve_transformer_impl(config.transformer_impl)


def check_run(config: TrainConfig, arch: Qwen3Arch, impl: str, world_size: int | None = None) -> ParallelLayout:
    """The settings, the model's fit to the layout and the machine; the layout when all is well."""
    config.check(world_size)
    layout = config.parallel_layout(arch)
    problems = layout_problems(arch, layout, impl, config.run_features(), world_size)
    if problems:
        raise TrainConfigError(problems[0])
    if config.optimizer_offload_fraction is not None and not torch.cuda.is_available():
        raise TrainConfigError("--optimizer-offload-fraction offloads GPU optimizer state; this run has no GPU")
    return layout


def check_outputs(config: TrainConfig) -> None:
    """Every output can be written, before anything is trained: --save-hf and --save-peft, replaced by each
    write, may hold only an earlier output of the kit (its checksums.json), never a file or other files."""
    for label, output in (("--save", config.save), ("--save-hf", config.save_hf), ("--save-peft", config.save_peft)):
        if not output:
            continue
        if label != "--save":
            try:
                check_replaceable(Path(output).absolute(), label, force=True, only_own=True)
            except CheckpointError as err:
                raise TrainConfigError(str(err)) from None
        try:
            check_writable(output, label)
        except OutputError as err:
            raise TrainConfigError(str(err)) from None


def check_inputs(config: TrainConfig) -> None:
    """The data and the checkpoint to start from exist and are whole.

    The launcher runs this just before torchrun (not for a dry run), the trainer before it builds
    anything: a missing or truncated file is named once, not by every worker.
    """
    if config.dataset_type == "raw":
        for path in [*config.data_path, *(config.valid_data_path or [])]:
            if not Path(path).is_file():
                raise DataConfigError(f"--data-path {path}: no such file")
    else:
        prefixes, _ = weighted_prefixes(config.data_path)
        for prefix in prefixes:
            for part in (prefix, prefix + MASK_SUFFIX) if config.sft else (prefix,):
                try:
                    check_indexed_dataset(part)
                except IndexedDatasetError as err:
                    raise DataConfigError(f"--data-path {prefix}: {err}") from None
    check_outputs(config)
    # A rerun that resumes from --save does not read --load (LoRA aside, checked when it loads).
    if config.load and not (config.save and isinstance(tracked_iteration(config.save), int)):
        if is_hf_model_dir(config.load):
            check_hf_model(config.load, resolve_model(config.model)[0])
        else:
            resolve_checkpoint(config.load)
