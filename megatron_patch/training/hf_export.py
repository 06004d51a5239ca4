"""HF out: ``--save-hf`` (and ``--save-peft``) written from a save just made, by every rank of the job.

What is written is the converter's own torch_dist -> HF of that checkpoint
(``convert.run.megatron_to_hf``), so it equals, byte for byte, what
``python -m megatron_patch.convert --mg2hf`` makes of the same save. LoRA runs write the merged
model: the base (the save itself, or ``--load`` for adapter-only saves, torch_dist or HF) plus
scale * B @ A. The converter's template describes the checkpoint at TP=PP=EP=1 and is built under
Megatron-Core's process groups of that canonical layout, so ``prepare`` runs before the training
layout's groups exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_patch.checkpoints import resolve_checkpoint
from megatron_patch.checkpoints.manifest import output_made_from
from megatron_patch.convert.config import ConvertConfig
from megatron_patch.convert.run import megatron_to_hf
from megatron_patch.convert.template import CheckpointTemplate, checkpoint_template
from megatron_patch.lora.adapter_checkpoint import AdapterCheckpoint
from megatron_patch.lora.peft_adapter import write_peft_adapter
from megatron_patch.models.choices import PRECISIONS
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.training.config import TrainConfig


@dataclass
class HFExport:
    config: TrainConfig
    arch: Qwen3Arch
    template: CheckpointTemplate
    hf_dir: Path | None  # the run's HF model directory: config.json and the like, and a PEFT adapter's base
    tokenizer_dir: Path  # the tokenizer files the HF directory lacks

    @classmethod
    def prepare(cls, config: TrainConfig, arch: Qwen3Arch, hf_dir: Path | None,
                tokenizer_dir: Path) -> HFExport | None:
        """None without --save-hf and --save-peft. Needs the canonical process groups (TP=PP=EP=1)."""
        if not (config.save_hf or config.save_peft):
            return None
        return cls(config, arch, checkpoint_template(arch, config.weights_precision), hf_dir, tokenizer_dir)

    def due(self, iteration: int, final: bool) -> bool:
        interval = self.config.save_hf_interval
        return final or (interval is not None and iteration % interval == 0)

    def write(self, checkpoint: Path, lora: bool, final: bool) -> None:
        """The HF model (and, at the end, the PEFT adapter) of the save ``checkpoint``; every rank calls this."""
        config, arch, precision = self.config, self.arch, self.config.weights_precision
        adapters = AdapterCheckpoint.open(checkpoint) if lora else None
        if config.save_hf:
            base, delta = checkpoint, None
            if adapters is not None:
                base = Path(config.load) if adapters.adapters_only else checkpoint
                delta = lambda address: adapters.delta(address, arch)  # noqa: E731
            # Replaces only an earlier output of the kit; records the save it is made from (catch_up reads it).
            convert = ConvertConfig(load_dir=base, save_dir=Path(config.save_hf), mg2hf=True, precision=precision,
                                    force=True, only_own=True, made_from=_identity(checkpoint))
            megatron_to_hf(convert, arch, self.hf_dir, delta, self.template, tokenizer_dir=self.tokenizer_dir)
            _say(f"saved HF model {config.save_hf} (from {checkpoint})")
        if config.save_peft and final and adapters is not None:
            write_peft_adapter(arch, adapters, config.save_peft, PRECISIONS[precision],
                               base_model=str(self.hf_dir) if self.hf_dir else None, force=True, only_own=True,
                               made_from=_identity(checkpoint))
            _say(f"saved PEFT adapter {config.save_peft}")

    def catch_up(self, lora: bool) -> None:
        """A rerun that finds its training finished: write the HF outputs of the final save when they are not
        from it (a kill stopped their write: missing, or an earlier --save-hf-interval output). Every rank calls
        this; an output already made from the final save is left as it is."""
        checkpoint = resolve_checkpoint(self.config.save).path
        wanted = [self.config.save_hf, self.config.save_peft if lora else None]
        if any(out and output_made_from(out) != _identity(checkpoint) for out in wanted):
            _say(f"the HF outputs are not from the final save {checkpoint}: writing them")
            self.write(checkpoint, lora, final=True)


def _identity(checkpoint: Path) -> str:
    return str(Path(checkpoint).resolve())


def _say(line: str) -> None:
    if dist.get_rank() == 0:
        print(line, flush=True)
