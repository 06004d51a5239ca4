"""Export a LoRA checkpoint: merged into its base as an HF model, or as an HF PEFT adapter.

Both read the adapters straight from the torch_dist checkpoint, whatever layout trained them
(EP, PP, DP): a key holds every layer (and expert) of one target, e.g.
``decoder.layers.mlp.experts.experts.linear_fc1.adapter.linear_in.weight`` [layers, experts, r, in].

- Merge: W' = W + (alpha / r) * B @ A on each adapted Megatron tensor, in fp32, then the
  converter's mapping writes HF tensors (fused qkv and [gate; up] split as for any weight).
- PEFT: B is split like the weight it adapts (qkv per query group, fc1 into gate and up) and A,
  shared by the parts of a fused weight, is repeated for each; keys are
  ``base_model.model.<HF module>.lora_{A,B}.weight``, per expert for MoE layers, which
  peft 0.21 loads onto transformers' fused experts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from megatron_patch.convert.output import ConversionError, StagedOutput
from megatron_patch.convert.torch_dist_reader import TorchDistCheckpoint
from megatron_patch.lora.config import LoraSettings
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.mapping import bound_qwen3_mappings
from megatron_patch.models.weight_mapping import MegatronAddress

# The base weights an adapter can sit on, and the target that names them.
_ADAPTED_WEIGHT = re.compile(
    r"^decoder\.layers\.(?:self_attention|mlp|mlp\.experts\.experts)\."
    r"(linear_qkv|linear_proj|linear_fc1|linear_fc2)\.weight$"
)
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"


class ExportError(ConversionError):
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
    def open(cls, load_dir: str | Path) -> "AdapterCheckpoint":
        from megatron_patch.training.checkpointing import checkpoint_info, resolve_load_dir

        path, _ = resolve_load_dir(load_dir)
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
        from megatron_patch.lora.apply import adapted_shape

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


def peft_tensors(arch: Qwen3Arch, adapters: AdapterCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT key, tensor) for every adapter, in the HF names of the weights they adapt."""
    # peft 0.21.2 loads per-expert gate/up adapters into transformers' fused experts only when
    # down_proj is adapted too (its key conversion assumes gate_up_proj is the inner wrapper);
    # a zero adapter on down_proj changes nothing and lets it load.
    zero_down = "linear_fc1" in adapters.settings.targets and "linear_fc2" not in adapters.settings.targets
    rank = adapters.settings.rank
    for bound in bound_qwen3_mappings(arch):
        expert_down = bound.address.key == "decoder.layers.mlp.experts.experts.linear_fc2.weight"
        if adapters.covers(bound.address):
            a, b = adapters.factors(bound.address, arch)
        elif zero_down and expert_down:
            a, b = torch.zeros(rank, arch.moe_ffn_hidden_size), torch.zeros(arch.hidden_size, rank)
        else:
            continue
        for name, b_part in bound.to_hf(b).items():
            module = "base_model.model." + name.removesuffix(".weight")
            yield f"{module}.lora_A.weight", a
            yield f"{module}.lora_B.weight", b_part


def peft_config(adapters: AdapterCheckpoint, hf_modules: list[str], base_model: str | None) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields for plain LoRA on the given HF module names."""
    settings = adapters.settings
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": hf_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_peft_adapter(arch: Qwen3Arch, adapters: AdapterCheckpoint, output_dir: str | Path, dtype: torch.dtype,
                       base_model: str | None = None, force: bool = False) -> dict:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (staged, renamed when complete)."""
    from safetensors.torch import save_file

    # A is shared by the parts of a fused weight; safetensors wants each tensor in its own memory.
    tensors = {name: tensor.to(dtype, copy=True).contiguous() for name, tensor in peft_tensors(arch, adapters)}
    modules = sorted({name.split(".")[-3] for name in tensors})
    config = peft_config(adapters, modules, base_model)
    with StagedOutput(output_dir, force) as staging:
        save_file(tensors, str(staging / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def build_model_with_adapters(arch: Qwen3Arch, base_dir: str | Path, adapters: AdapterCheckpoint, precision: str):
    """A Megatron model of ``arch`` with the base weights of ``base_dir`` and the saved adapters (one process)."""
    from megatron_patch.lora.apply import apply_lora, is_adapter_key
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.training.checkpointing import load_checkpoint

    model = build_gpt_model(arch, BuildOptions(precision=precision, aux_loss_coeff=0.0))
    apply_lora([model], adapters.settings)
    load_checkpoint(base_dir, [model], None, None, load_optim=False, keep=lambda key: not is_adapter_key(key))
    load_checkpoint(adapters.path, [model], None, None, load_optim=False, keep=is_adapter_key)
    return model.eval()


@torch.no_grad()
def peft_logits(hf_base_dir: str | Path, peft_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of transformers' model from ``hf_base_dir`` with the PEFT adapter of ``peft_dir`` applied by peft."""
    from peft import PeftModel

    from megatron_patch.models.qwen3.hf_model import load_hf_model

    model = PeftModel.from_pretrained(load_hf_model(hf_base_dir, torch.float32), str(peft_dir)).eval()
    return model(input_ids=tokens).logits.float()
