"""The conversion job: resolve the architecture, convert into a staged directory, optionally verify."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patch import __version__
from megatron_patch.checkpoints import (
    StagedOutput,
    copy_side_files,
    is_hf_model_dir,
    load_weights,
    resolve_checkpoint,
    write_tracker,
)
from megatron_patch.checkpoints.manifest import MANIFEST_FILE, verify_manifest
from megatron_patch.convert.config import ConversionError, ConvertConfig
from megatron_patch.convert.finite import FiniteCheck
from megatron_patch.convert.to_hf import write_hf_safetensors
from megatron_patch.convert.to_megatron import write_torch_dist
from megatron_patch.models.choices import DTYPE_NAMES
from megatron_patch.models.layout_check import layout_problems
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.qwen3.parity import compare_with_transformers, probe_tokens
from megatron_patch.models.qwen3.presets import get_preset
from megatron_patch.parallel import ParallelLayout, initialize_parallel


class Progress:
    """A byte/tensor progress bar on rank 0 (tqdm), silent elsewhere."""

    def __init__(self, description: str):
        self.description, self.bar, self.tensors = description, None, 0

    def start(self, total_bytes: int) -> None:
        if dist.get_rank() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=self.description, mininterval=1.0)

    def update(self, tensor: torch.Tensor) -> None:
        self.tensors += 1
        if self.bar is not None:
            self.bar.update(tensor.numel() * tensor.element_size())
            self.bar.set_postfix(tensors=self.tensors, refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.close()
        return False


def resolve_arch(config: ConvertConfig) -> tuple[Qwen3Arch, Path | None]:
    """The architecture from config.json (or the preset), and the directory that config came from."""
    if config.mg2hf:
        candidates = [config.hf_dir] if config.hf_dir else [config.load_dir, config.load_dir.parent]
    else:
        candidates = [config.load_dir]
    config_dir = next((d for d in candidates if d is not None and (d / "config.json").is_file()), None)
    if not config.load_dir.exists():
        raise ConversionError(f"{config.load_dir}: no such directory")
    if config_dir is None and config.model_size == "auto":
        raise ConversionError(f"no config.json in {candidates[0]}; pass --hf-dir or a --model-size preset")
    arch = Qwen3Arch.from_hf_dir(config_dir) if config_dir else None
    if config.model_size != "auto":
        try:
            preset = get_preset(config.model_size)
        except KeyError as err:
            raise ConversionError(err.args[0]) from None
        if arch is None:
            return preset, None
        differences = preset.shape_differences(arch)
        if differences:
            raise ConversionError(
                f"MODEL_SIZE {config.model_size} does not match {config_dir / 'config.json'}: {differences[0]}"
            )
    return arch, config_dir


def _staged_output(config: ConvertConfig) -> StagedOutput:
    # The inputs are protected: SAVE_DIR at, inside or around them would delete them (even with --force).
    return StagedOutput(config.save_dir, config.force, "SAVE_DIR", sources=(config.load_dir, config.hf_dir),
                        only_own=config.only_own, made_from=config.made_from)


def hf_to_megatron(config: ConvertConfig, arch: Qwen3Arch) -> Path:
    if (config.load_dir / MANIFEST_FILE).is_file():  # our own mg2hf output: its bytes are checked
        verify_manifest(config.load_dir)
    finite = FiniteCheck(config.check_finite)
    with _staged_output(config) as staging, Progress("hf -> torch_dist") as progress:
        release = staging / "release"
        if dist.get_rank() == 0:
            release.mkdir()
        dist.barrier()
        write_torch_dist(
            arch, config.load_dir, release, config.precision,
            common_extra={
                "source": str(config.load_dir.absolute()),
                "converter": f"megatron_patch {__version__}",
                "layout": config.layout.megatron_sizes(),
            },
            progress=progress, finite=finite,
        )
        finite.raise_if_found()
        if dist.get_rank() == 0:
            write_tracker(staging, "release")
            copy_side_files(config.load_dir, staging, DTYPE_NAMES[config.precision])
    return config.save_dir / "release"


def megatron_to_hf(config: ConvertConfig, arch: Qwen3Arch, config_dir: Path | None, delta=None,
                   template=None, tokenizer_dir: Path | None = None) -> Path:
    """torch_dist -> HF; ``delta`` (see ``write_hf_safetensors``) changes tensors on the way (LoRA merge,
    whose base may also be an HF directory; without a delta an HF directory is no torch_dist and is
    refused). ``template``: see ``write_hf_safetensors``. Side files come from ``config_dir``, then
    the ones it lacks from ``tokenizer_dir``."""
    if delta is not None and is_hf_model_dir(config.load_dir):  # a LoRA merge onto an HF base
        checkpoint_dir = config.load_dir
    else:
        checkpoint_dir = resolve_checkpoint(config.load_dir, config.iteration).path
    finite = FiniteCheck(config.check_finite)
    with _staged_output(config) as staging, Progress("torch_dist -> hf") as progress:
        write_hf_safetensors(arch, checkpoint_dir, staging, config.precision, config.max_shard_bytes, progress,
                             delta, finite, template)
        finite.raise_if_found()
        if dist.get_rank() == 0:
            dtype_name = DTYPE_NAMES[config.precision]
            copied = copy_side_files(config_dir, staging, dtype_name) if config_dir else []
            if tokenizer_dir is not None:
                copied += copy_side_files(tokenizer_dir, staging, overwrite=False)
            if "config.json" not in copied:
                hf_config = arch.to_hf_config() | {"torch_dtype": dtype_name}
                (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return checkpoint_dir


def verify_memory_shortfall(arch: Qwen3Arch) -> str | None:
    """Why a logits check of ``arch`` does not fit in this machine's memory (None when it does)."""
    import psutil

    # An fp32 Megatron model and up to two transformers models at once.
    needed = arch.parameter_counts()["total"] * 4 * 3
    available = psutil.virtual_memory().available
    if needed > available:
        return f"{needed / 2**30:.0f} GiB needed, {available / 2**30:.0f} GiB available"
    return None


def verify(config: ConvertConfig, arch: Qwen3Arch, hf_dir: Path, checkpoint_dir: Path) -> None:
    """Load both sides and compare logits on a short prompt; raises ConversionError on a mismatch."""
    if dist.get_world_size() > 1:
        print("verify: skipped (it runs in single-process conversions)")
        return
    shortfall = verify_memory_shortfall(arch)
    if shortfall:
        print(f"verify: skipped ({shortfall})")
        return
    device = "cuda" if config.use_cuda and torch.cuda.is_available() else "cpu"
    model = build_gpt_model(arch, BuildOptions(precision=config.precision, aux_loss_coeff=0.0))
    load_weights(checkpoint_dir, [model])
    result = compare_with_transformers(arch, hf_dir, probe_tokens(arch), config.precision, device=device,
                                       model_chunks=model)
    print(f"verify: {result}")
    if not result.passed:
        raise ConversionError(f"verify failed: {result}")


def convert(config: ConvertConfig) -> None:
    # The canonical layout: every process holds the whole (meta) template; work is split by bytes.
    initialize_parallel(ParallelLayout())
    arch, config_dir = resolve_arch(config)
    problems = layout_problems(arch, config.layout)
    if problems:
        raise ConversionError(f"MODEL_PARALLEL_ARGS: {problems[0]}")
    if config.mg2hf:
        checkpoint_dir = megatron_to_hf(config, arch, config_dir)
        hf_dir = config.save_dir
    else:
        checkpoint_dir = hf_to_megatron(config, arch)
        hf_dir = config.load_dir
    if dist.get_rank() == 0:
        print(f"converted {config.load_dir} -> {config.save_dir}")
    if config.verify:
        verify(config, arch, hf_dir, checkpoint_dir)
