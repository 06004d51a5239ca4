"""What a LoRA run saves and loads: the adapters' record, which keys go into a save, which come from where.

A LoRA save records its adapters (rank, alpha, targets), whether it holds the adapters only,
and the base checkpoint training started from, so that export finds the base of an
adapter-only save. Loading takes the base weights from ``--load`` and the adapters (with their
optimizer state and data position) from ``--lora-load``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.checkpoints import CheckpointError, checkpoint_info, is_hf_model_dir
from megatron_patch.lora.apply import is_adapter_key
from megatron_patch.lora.config import LoraSettings


def is_base_key(key: str) -> bool:
    return not is_adapter_key(key)


@dataclass(frozen=True)
class AdapterSavePolicy:
    """How a LoRA run's saves are written."""

    settings: LoraSettings
    adapters_only: bool  # --save-lora-only: the adapters and their optimizer state, not the frozen base
    base: str | None  # the checkpoint the run loaded its base weights from

    @classmethod
    def for_run(cls, settings: LoraSettings, adapters_only: bool, load: str | None) -> AdapterSavePolicy:
        return cls(settings, adapters_only, str(Path(load).absolute()) if load else None)

    def record(self) -> dict:
        """The ``lora`` entry of the checkpoint's record."""
        return {**self.settings.describe(), "adapters_only": self.adapters_only, "base": self.base}

    def keep(self):
        """The key filter of a save: the adapters alone, or the whole model (None)."""
        return is_adapter_key if self.adapters_only else None


def base_load_filter(load: str, settings: LoraSettings | None):
    """(key filter, whether optimizer state may be restored) for ``--load`` of a run with or without LoRA."""
    if is_hf_model_dir(load):  # an HF base model: its weights, fresh adapters
        return (is_base_key if settings is not None else None), False
    info = checkpoint_info(load)
    if info.get("lora", {}).get("adapters_only"):
        raise CheckpointError(f"--load {load}: holds LoRA adapters only; give the base model as --load and this "
                              "checkpoint as --lora-load")
    if settings is not None and "lora" not in info:
        # A base model (converter output or a full fine-tuning save): its weights, fresh adapters.
        return is_base_key, False
    return None, True


def check_adapter_checkpoint(lora_load: str, settings: LoraSettings) -> None:
    """``--lora-load`` holds adapters of this run's rank and targets."""
    saved = checkpoint_info(lora_load).get("lora")
    if saved is None:
        raise CheckpointError(f"--lora-load {lora_load}: not a LoRA checkpoint")
    wanted = settings.describe()
    if saved["rank"] != wanted["rank"] or list(saved["targets"]) != wanted["targets"]:
        raise CheckpointError(f"--lora-load {lora_load}: adapters of rank {saved['rank']} on "
                              f"{' '.join(saved['targets'])} do not match this run's")
