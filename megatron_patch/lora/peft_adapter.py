"""An HF PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) from a LoRA save.

B is split like the weight it adapts (qkv per query group, fc1 into gate and up) and A, shared
by the parts of a fused weight, is repeated for each; keys are
``base_model.model.<HF module>.lora_{A,B}.weight``, per expert for MoE layers, which peft 0.21
loads onto transformers' fused experts.

On a Qwen3-MoE model, peft (0.21, with transformers 5) turns ``gate_proj``/``up_proj``/
``down_proj`` in ``target_modules`` into the experts' fused parameters, so the same names would
silently miss the MLP of a dense layer (``mlp_only_layers``). Those weights are named one by one
in ``target_parameters`` instead, which peft applies to any weight, with the same keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_patch.checkpoints import StagedOutput
from megatron_patch.lora.adapter_checkpoint import AdapterCheckpoint
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.hf_model import load_hf_model
from megatron_patch.models.qwen3.mapping import bound_qwen3_mappings

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"


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


_DENSE_MLP_KEY = re.compile(
    r"^base_model\.model\.(model\.layers\.(\d+)\.mlp\.(?:gate|up|down)_proj)\.lora_[AB]\.weight$"
)
# Where peft puts a per-expert adapter: onto the experts' fused parameter of transformers 5.
_PER_EXPERT = [(re.compile(r"\.experts\.\d+\.(?:gate|up)_proj$"), ".experts.gate_up_proj"),
               (re.compile(r"\.experts\.\d+\.down_proj$"), ".experts.down_proj")]


def peft_targets(arch: Qwen3Arch, tensor_names) -> tuple[list[str], list[str]]:
    """(target_modules: HF leaf names, target_parameters: full weight names) that apply every tensor."""
    modules, parameters = set(), set()
    for name in tensor_names:
        dense = _DENSE_MLP_KEY.match(name)
        if arch.is_moe and dense and not arch.layer_is_moe(int(dense.group(2))):
            parameters.add(dense.group(1) + ".weight")
        else:
            modules.add(name.split(".")[-3])
    return sorted(modules), sorted(parameters)


def peft_config(adapters: AdapterCheckpoint, hf_modules: list[str], base_model: str | None,
                hf_parameters: list[str] = ()) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields for plain LoRA on the given HF modules and weights."""
    settings = adapters.settings
    extra = {"target_parameters": list(hf_parameters)} if hf_parameters else {}
    return extra | {
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
                       base_model: str | None = None, force: bool = False, only_own: bool = False,
                       made_from: str | None = None) -> dict:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (staged, renamed when complete)."""
    # A is shared by the parts of a fused weight; safetensors wants each tensor in its own memory.
    tensors = {name: tensor.to(dtype, copy=True).contiguous() for name, tensor in peft_tensors(arch, adapters)}
    modules, parameters = peft_targets(arch, tensors)
    config = peft_config(adapters, modules, base_model, parameters)
    # Every rank of a job enters the staged output; one writes the files.
    with StagedOutput(output_dir, force, "--peft-out", sources=(adapters.path,), only_own=only_own,
                      made_from=made_from) as staging:
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_file(tensors, str(staging / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
            (staging / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def unapplied_adapters(peft_model, peft_dir: str | Path) -> list[str]:
    """The HF modules of ``peft_dir``'s adapter file that peft wrapped neither as a module nor a weight."""
    from safetensors import safe_open

    with safe_open(str(Path(peft_dir) / PEFT_WEIGHTS_FILE), "pt") as handle:
        modules = {key.removeprefix("base_model.model.").rsplit(".", 2)[0] for key in handle.keys()}
    tuner = peft_model.base_model
    applied = set(tuner.targeted_module_names) | set(getattr(tuner, "targeted_parameter_names", ()))
    missing = []
    for module in sorted(modules):
        fused = module
        for pattern, replacement in _PER_EXPERT:
            fused = pattern.sub(replacement, fused)
        if not {module, module + ".weight", fused} & applied:
            missing.append(module)
    return missing


@torch.no_grad()
def peft_logits(hf_base_dir: str | Path, peft_dir: str | Path, tokens: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """fp32 logits of transformers' model from ``hf_base_dir`` with the PEFT adapter of ``peft_dir`` applied by
    peft, and the adapters peft did not apply (see ``unapplied_adapters``)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf_model(hf_base_dir, torch.float32), str(peft_dir)).eval()
    return model(input_ids=tokens).logits.float(), unapplied_adapters(model, peft_dir)
