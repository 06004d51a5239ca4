"""The adapters of a LoRA save, read straight from its torch_dist checkpoint.

Whatever layout trained them (EP, PP, DP), a key holds every layer (and expert) of one target,
e.g. ``decoder.layers.mlp.experts.experts.linear_fc1.adapter.linear_in.weight``
[layers, experts, r, in]. ``delta`` gives the change an adapter makes to its weight when merged:
W' = W + (alpha / r) * B @ A, in fp32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_patch.checkpoints import TorchDistCheckpoint, checkpoint_info, load_weights, resolve_checkpoint
from megatron_patch.errors import InputError
from megatron_patch.lora.apply import apply_lora, is_adapter_key
from megatron_patch.lora.checkpoints import is_base_key
from megatron_patch.lora.config import LoraSettings, adapted_shape
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.weight_mapping import MegatronAddress

# The base weights an adapter can sit on, and the target that names them.
_ADAPTED_WEIGHT = re.compile(
    r"^decoder\.layers\.(?:self_attention|mlp|mlp\.experts\.experts)\."
    r"(linear_qkv|linear_proj|linear_fc1|linear_fc2)\.weight$"
)


class ExportError(InputError):
    """A checkpoint that cannot be exported as asked; the message names the file or tensor."""


def adapted_target(address: MegatronAddress) -> str | None:
    """The LoRA target (``linear_qkv`` ...) a base weight belongs to, or None for weights never adapted."""
    match = _ADAPTED_WEIGHT.match(address.key)
    return match.group(1) if match else None


@dataclass
class AdapterCheckpoint:
    """The adapters of one LoRA save (an iteration directory), read on demand in fp32."""

    path: Path
    settings: LoraSettings
    adapters_only: bool
    base: Path | None  # the checkpoint training started from, as recorded at save time
    reader: TorchDistCheckpoint = field(repr=False)

    @classmethod
    def open(cls, load_dir: str | Path) -> AdapterCheckpoint:
        path = resolve_checkpoint(load_dir).path
        lora = checkpoint_info(path).get("lora")
        if lora is None:
            raise ExportError(f"{path}: not a LoRA checkpoint (no adapters recorded; was it trained with --lora-rank?)")
        settings = LoraSettings(int(lora["rank"]), float(lora["alpha"]), float(lora.get("dropout", 0.0)),
                                tuple(lora["targets"]))
        base = Path(lora["base"]) if lora.get("base") else None
        return cls(path, settings, bool(lora.get("adapters_only")), base, TorchDistCheckpoint(path))

    def covers(self, address: MegatronAddress) -> bool:
        return adapted_target(address) in self.settings.targets

    def _read(self, address: MegatronAddress, part: str) -> torch.Tensor:
        key = address.key.removesuffix("weight") + f"adapter.{part}.weight"
        leading = tuple(i for i in (address.layer, address.expert) if i is not None)
        stored, offsets = self.reader.locate(key, leading)
        shape = self.reader.global_shape(stored)
        if shape is None:
            raise ExportError(f"{self.path}: adapter tensor {key} is missing "
                              f"(trained on {' '.join(self.settings.targets)})")
        inner = shape[len(offsets):]
        if len(inner) != 2:
            raise ExportError(f"{self.path}: adapter tensor {stored} has shape {shape}; expected one [.., r, in/out] "
                              f"matrix per {' and '.join(('layer', 'expert')[:len(leading)])}")
        region = self.reader.read(stored, offsets + (0, 0), (1,) * len(offsets) + inner, torch.float32)
        return region.reshape(inner)

    def factors(self, address: MegatronAddress, arch: Qwen3Arch) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of the adapter on ``address``, fp32, checked against ``arch``."""
        a, b = self._read(address, "linear_in"), self._read(address, "linear_out")
        out_features, in_features = adapted_shape(arch, adapted_target(address), address.expert is not None)
        rank = self.settings.rank
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise ExportError(f"{self.path}: adapter on {address} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                              f"rank {rank} on this model needs A {(rank, in_features)} and B {(out_features, rank)} "
                              "(adapters of another model?)")
        return a, b

    def delta(self, address: MegatronAddress, arch: Qwen3Arch) -> torch.Tensor | None:
        """scale * B @ A for an adapted weight (its change when merged), None for any other tensor."""
        if not self.covers(address):
            return None
        a, b = self.factors(address, arch)
        return (b @ a) * self.settings.scale


def build_model_with_adapters(arch: Qwen3Arch, base_dir: str | Path, adapters: AdapterCheckpoint, precision: str):
    """A Megatron model of ``arch`` with the base weights of ``base_dir`` and the saved adapters (one process)."""
    model = build_gpt_model(arch, BuildOptions(precision=precision, aux_loss_coeff=0.0))
    apply_lora([model], adapters.settings)
    load_weights(base_dir, [model], keep=is_base_key)
    load_weights(adapters.path, [model], keep=is_adapter_key)
    return model.eval()
