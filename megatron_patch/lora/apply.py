"""Freeze a Megatron-Core GPTModel and attach LoRA adapters to its target linears.

Applied after the model is built and before DDP wraps it (Megatron-Core's DDP and optimizer
skip frozen parameters, so gradients buffers and optimizer state exist only for adapters).
Adapters are submodules named ``adapter`` on each target linear (``...linear_qkv.adapter.
linear_in.weight``), so a model's sharded state dict keeps every base key unchanged and adds
the adapter keys beside them; a forward hook adds the adapter's output to the linear's.
"""

from __future__ import annotations

import torch

from megatron_patch.lora.config import LoraConfigError, LoraSettings
from megatron_patch.lora.layers import GroupedLoraAdapter, LoraAdapter

ADAPTER_KEY_PART = ".adapter."  # in every adapter parameter's checkpoint key (dense, expert, grouped)


def _add_adapter_output(module, args, output):
    out, bias = output
    return out + module.adapter(args[0]), bias


def _mark_expert_parameters(adapter) -> None:
    """As Megatron-Core marks expert weights: with EP, DDP reduces them over the expert-data-parallel group."""
    from megatron.core import parallel_state

    for parameter in adapter.parameters():
        parameter.allreduce = parallel_state.get_expert_model_parallel_world_size() == 1


def _attach(linear, settings: LoraSettings, name: str, expert: bool = False) -> None:
    weight = linear.weight
    out_features, in_features = weight.shape
    linear.adapter = LoraAdapter(in_features, out_features, settings.rank, settings.scale, settings.dropout,
                                 name, settings.seed, weight.dtype, weight.device)
    if expert:
        _mark_expert_parameters(linear.adapter)
    linear.register_forward_hook(_add_adapter_output)


def _check_layout() -> None:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    if tp > 1 or etp > 1:
        raise LoraConfigError(f"LoRA with tensor parallelism (TP {tp}, ETP {etp}) is not supported yet; "
                              "use TP=1 with EP/PP/DP")


def is_adapter_key(key: str) -> bool:
    """Whether a checkpoint key belongs to a LoRA adapter."""
    return ADAPTER_KEY_PART in key


def apply_lora(chunks, settings: LoraSettings) -> None:
    """Freeze every parameter of ``chunks`` and attach adapters to ``settings.targets``; in place."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_patch.models.experts import GroupedGemmExperts

    _check_layout()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for chunk in chunks:
        for parameter in chunk.parameters():
            parameter.requires_grad_(False)
        for layer in (m for m in chunk.modules() if isinstance(m, TransformerLayer)):
            prefix = f"decoder.layers.{layer.layer_number - 1}"  # global layer, whatever the pipeline stage
            attention = layer.self_attention
            for target in ("linear_qkv", "linear_proj"):
                if target in settings.targets:
                    _attach(getattr(attention, target), settings, f"{prefix}.self_attention.{target}")
            mlp = layer.mlp
            if not isinstance(mlp, MoELayer):
                for target in ("linear_fc1", "linear_fc2"):
                    if target in settings.targets and hasattr(mlp, target):
                        _attach(getattr(mlp, target), settings, f"{prefix}.mlp.{target}")
                continue
            if getattr(mlp, "shared_experts", None) is not None:
                raise LoraConfigError("LoRA on shared experts is not supported (Qwen3-MoE has none)")
            experts = mlp.experts
            first = ep_rank * experts.num_local_experts
            if isinstance(experts, SequentialMLP):
                for local, expert in enumerate(experts.local_experts):
                    for target in ("linear_fc1", "linear_fc2"):
                        if target in settings.targets:
                            _attach(getattr(expert, target), settings,
                                    f"{prefix}.mlp.experts.{first + local}.{target}", expert=True)
            elif isinstance(experts, GroupedGemmExperts):
                for target, stacked, slot in (("linear_fc1", experts.weight1, "fc1_adapter"),
                                              ("linear_fc2", experts.weight2, "fc2_adapter")):
                    if target in settings.targets:
                        count, out_features, in_features = stacked.shape
                        names = [f"{prefix}.mlp.experts.{first + e}.{target}" for e in range(count)]
                        adapter = GroupedLoraAdapter(
                            count, in_features, out_features, settings.rank, settings.scale, settings.dropout,
                            names, settings.seed, stacked.dtype, stacked.device)
                        _mark_expert_parameters(adapter)
                        setattr(experts, slot, adapter)
            else:
                raise LoraConfigError(f"LoRA: experts module {type(experts).__name__} is not supported "
                                      "(use --transformer-impl torch or local)")


def adapted_shape(arch, target: str, expert: bool = False) -> tuple[int, int]:
    """(out, in) features of the weight a target adapts (an expert's, or a dense layer's)."""
    hidden, q = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    ffn = arch.moe_ffn_hidden_size if expert else arch.ffn_hidden_size
    return {
        "linear_qkv": (q + 2 * arch.num_query_groups * arch.head_dim, hidden),
        "linear_proj": (hidden, q),
        "linear_fc1": (2 * ffn, hidden),
        "linear_fc2": (hidden, ffn),
    }[target]


def trainable_parameter_count(arch, settings: LoraSettings) -> int:
    """Adapter parameters of the whole model (any layout): rank x (in + out) per adapted linear."""
    total = 0
    for moe in arch.moe_layer_pattern:
        for target in settings.targets:
            expert = moe and target in ("linear_fc1", "linear_fc2")
            copies = arch.num_experts if expert else 1
            total += copies * settings.rank * sum(adapted_shape(arch, target, expert))
    return total


def adapter_parameters(chunks) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for chunk in chunks for n, p in chunk.named_parameters() if p.requires_grad]
