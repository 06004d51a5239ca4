"""Freeze a Megatron-Core GPTModel and attach LoRA adapters to its target linears.

Applied after the model is built and before DDP wraps it (Megatron-Core's DDP and optimizer
skip frozen parameters, so gradients buffers and optimizer state exist only for adapters).
Adapters are submodules named ``adapter`` on each target linear (``...linear_qkv.adapter.
linear_in.weight``), so a model's sharded state dict keeps every base key unchanged and adds
the adapter keys beside them; a forward hook adds the adapter's output to the linear's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_patch.lora.config import LoraConfigError, LoraSettings, adapted_shape
from megatron_patch.lora.layers import GroupedLoraAdapter, LoraAdapter, TpSplit
from megatron_patch.models.experts import GroupedGemmExperts
from megatron_patch.patches.expert_grads import expert_params_reduce_with_dense

ADAPTER_KEY_PART = ".adapter."  # in every adapter parameter's checkpoint key (dense, expert, grouped)


def _add_adapter_output(module, args, output):
    out, bias = output
    return out + module.adapter(args[0]), bias


def _mark_expert_parameters(adapter) -> None:
    """As expert weights are marked: DDP reduces them over the expert-data-parallel group unless it is the dense one."""
    shared = expert_params_reduce_with_dense()
    for parameter in adapter.parameters():
        parameter.allreduce = shared


def _split_of(linear) -> TpSplit:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    kind = "column" if isinstance(linear, ColumnParallelLinear) else "row" if isinstance(linear, RowParallelLinear) \
        else None
    if kind is None:
        raise LoraConfigError(f"LoRA: {type(linear).__name__} is not a Megatron-Core parallel linear "
                              "(the Transformer-Engine spec is not supported; use --transformer-impl torch or local)")
    return TpSplit(kind, linear.tp_group, bool(getattr(linear, "sequence_parallel", False)),
                   bool(getattr(linear, "explicit_expert_comm", False)))


def _with_sharded_adapter(linear, split: TpSplit, glu: bool) -> None:
    """Checkpoint the adapter factor that is split over TP as a TP-sharded tensor ([gate; up] halves
    for a gated fc1's B, as for its weight), so the saved adapter is the same at every layout.

    Megatron's parallel linears save every other parameter of theirs as replicated; this wraps the
    instance's ``sharded_state_dict`` and replaces that one entry.
    """
    original = linear.sharded_state_dict
    part, axis = ("linear_out", 0) if split.kind == "column" else ("linear_in", 1)

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

        state = original(prefix, sharded_offsets, metadata)
        key = f"{prefix}adapter.{part}.weight"
        replicated = state[key]
        sharded = make_tp_sharded_tensor_for_checkpoint(
            replicated.data, key, axis, prepend_offsets=sharded_offsets, tp_group=split.group,
            dp_cp_group=metadata["dp_cp_group"])
        sharded.replica_id = (*sharded.replica_id[:2], replicated.replica_id[2])
        state[key] = apply_swiglu_sharded_factory(sharded, sharded_offsets) if glu else sharded
        return state

    linear.sharded_state_dict = sharded_state_dict


def _attach(linear, settings: LoraSettings, name: str, glu: bool, expert: bool = False) -> None:
    split = _split_of(linear)
    out_local, in_local = linear.weight.shape
    in_features, out_features = split.whole(in_local, out_local)
    linear.adapter = LoraAdapter(in_features, out_features, settings.rank, settings.scale, settings.dropout,
                                 name, settings.seed, linear.weight.dtype, linear.weight.device, split)
    if expert:
        _mark_expert_parameters(linear.adapter)
    _with_sharded_adapter(linear, split, glu)
    linear.register_forward_hook(_add_adapter_output)


def is_adapter_key(key: str) -> bool:
    """Whether a checkpoint key belongs to a LoRA adapter."""
    return ADAPTER_KEY_PART in key


def apply_lora(chunks, settings: LoraSettings) -> None:
    """Freeze every parameter of ``chunks`` and attach adapters to ``settings.targets``; in place."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for chunk in chunks:
        gated = chunk.config.gated_linear_unit
        for parameter in chunk.parameters():
            parameter.requires_grad_(False)
        for layer in (m for m in chunk.modules() if isinstance(m, TransformerLayer)):
            prefix = f"decoder.layers.{layer.layer_number - 1}"  # global layer, whatever the pipeline stage
            attention = layer.self_attention
            for target in ("linear_qkv", "linear_proj"):
                if target in settings.targets:
                    _attach(getattr(attention, target), settings, f"{prefix}.self_attention.{target}", glu=False)
            mlp = layer.mlp
            if not isinstance(mlp, MoELayer):
                for target in ("linear_fc1", "linear_fc2"):
                    if target in settings.targets and hasattr(mlp, target):
                        _attach(getattr(mlp, target), settings, f"{prefix}.mlp.{target}",
                                glu=gated and target == "linear_fc1")
                continue
            if getattr(mlp, "shared_experts", None) is not None:
                raise LoraConfigError("LoRA on shared experts is not supported (Qwen3-MoE has none)")
            experts = mlp.experts
            first = ep_rank * experts.num_local_experts
            if isinstance(experts, SequentialMLP):
                for local, expert in enumerate(experts.local_experts):
                    for target in ("linear_fc1", "linear_fc2"):
                        if target in settings.targets:
                            _attach(getattr(expert, target), settings, f"{prefix}.mlp.experts.{first + local}.{target}",
                                    glu=gated and target == "linear_fc1", expert=True)
            elif isinstance(experts, GroupedGemmExperts):
                for target, stacked, slot, kind in (("linear_fc1", experts.weight1, "fc1_adapter", "column"),
                                                    ("linear_fc2", experts.weight2, "fc2_adapter", "row")):
                    if target in settings.targets:
                        count, out_local, in_local = stacked.shape
                        split = TpSplit(kind, experts.tp_group, expert=True)
                        in_features, out_features = split.whole(in_local, out_local)
                        names = [f"{prefix}.mlp.experts.{first + e}.{target}" for e in range(count)]
                        adapter = GroupedLoraAdapter(
                            count, in_features, out_features, settings.rank, settings.scale, settings.dropout,
                            names, settings.seed, stacked.dtype, stacked.device, split)
                        _mark_expert_parameters(adapter)
                        setattr(experts, slot, adapter)
            else:
                raise LoraConfigError(f"LoRA: experts module {type(experts).__name__} is not supported "
                                      "(use --transformer-impl torch or local)")


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


@contextmanager
def adapters_disabled(chunks):
    """The base model inside the block: every adapter's output scaled by 0 (GRPO's reference policy)."""
    adapters = [m for chunk in chunks for m in chunk.modules() if isinstance(m, (LoraAdapter, GroupedLoraAdapter))]
    scales = [adapter.scale for adapter in adapters]
    for adapter in adapters:
        adapter.scale = 0.0
    try:
        yield
    finally:
        for adapter, scale in zip(adapters, scales):
            adapter.scale = scale
