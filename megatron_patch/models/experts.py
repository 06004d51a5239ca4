"""MoE experts as two grouped GEMMs, for Megatron-Core's local layer spec.

Megatron-Core's ``SequentialMLP`` (the experts module without Transformer-Engine, 0.16.1) loops
in Python over its local experts: per layer of Qwen3-30B-A3B, 128 experts x (fc1, activation,
fc2), several small kernel launches each. ``GroupedGemmExperts`` holds the same weights stacked,
``weight1`` [experts, fc1 out, hidden] and ``weight2`` [experts, hidden, ffn], and runs
``torch.nn.functional.grouped_mm`` over the tokens sorted by expert (what the dispatcher hands
over): one kernel per projection. grouped_mm is used for bf16 (CUDA needs SM >= 80; torch's CPU
kernel is bf16 only too); otherwise a loop over experts computes the same thing.

Stacked weights in memory, SequentialMLP's weights on disk: ``sharded_state_dict`` describes each
expert slice as exactly the ShardedTensors SequentialMLP writes (same keys, offsets, replica ids,
[gate; up] halves, ``_extra_state`` objects), built with Megatron-Core's own helpers, so torch_dist
checkpoints, the converter and optimizer state move between the two modules unchanged. A
state dict in SequentialMLP's per-expert form also loads (``local_experts.N.linear_fc1.weight``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_patch.patches.expert_grads import expert_params_reduce_with_dense

_PER_EXPERT_KEY = re.compile(r"local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|_extra_state)$")


def grouped_mm_usable(tensor: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes this tensor's dtype and device."""
    if not hasattr(F, "grouped_mm") or tensor.dtype != torch.bfloat16:
        return False
    if tensor.is_cuda:
        return torch.cuda.get_device_capability(tensor.device)[0] >= 8
    return tensor.device.type == "cpu"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None,
                    counts: list[int] | None) -> torch.Tensor:
    """Row block e of ``x`` times ``weight[e]``^T, for each expert e."""
    if offsets is not None:
        return _ContiguousGrad.apply(F.grouped_mm(x, weight.transpose(1, 2), offs=offsets))
    blocks = torch.split(x, counts)
    return torch.cat([F.linear(block, weight[e]) for e, block in enumerate(blocks)])


class GroupedGemmExperts(MegatronModule):
    """Drop-in ``experts`` module for ``MoELayer``: SequentialMLP's maths and checkpoint, stacked weights."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, **unused):
        super().__init__(config=config)
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        if config.add_bias_linear:
            raise ValueError("GroupedGemmExperts: expert biases are not supported (Qwen3 has none)")
        if config.fp8 or getattr(config, "fp4", None):
            raise ValueError("GroupedGemmExperts: fp8/fp4 need Transformer-Engine's grouped linear")
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        tp = self.tp_group.size()
        ffn = config.moe_ffn_hidden_size
        if ffn % tp:
            raise ValueError(f"GroupedGemmExperts: moe_ffn_hidden_size {ffn} is not divisible by expert TP {tp}")
        self.gated = config.gated_linear_unit
        fc1_rows = (2 if self.gated else 1) * ffn // tp
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()

        def stacked(rows: int, cols: int, init_method, partition_dim: int) -> torch.nn.Parameter:
            weight = torch.nn.Parameter(
                torch.empty(num_local_experts, rows, cols, dtype=config.params_dtype, device=device)
            )
            if config.perform_initialization:
                with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                    for expert in range(num_local_experts):
                        init_method(weight.data[expert])
            # As ColumnParallelLinear / RowParallelLinear mark expert weights (one axis later: experts first).
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=partition_dim + 1, stride=1)
            weight.allreduce = expert_params_reduce_with_dense()  # see patches/expert_grads.py
            return weight

        self.weight1 = stacked(fc1_rows, config.hidden_size, config.init_method, partition_dim=0)
        self.weight2 = stacked(config.hidden_size, ffn // tp, config.output_layer_init_method, partition_dim=1)
        # Optional per-expert low-rank adapters (megatron_patch.lora): module(x, tokens_per_expert) -> delta.
        self.fc1_adapter: torch.nn.Module | None = None
        self.fc2_adapter: torch.nn.Module | None = None
        self._register_load_state_dict_pre_hook(self._stack_per_expert_state, with_module=False)

    # ------------------------------------------------------------------ forward
    def _activation(self, hidden: torch.Tensor) -> torch.Tensor:
        config = self.config
        if not self.gated:
            return config.activation_func(hidden)
        gate, linear = torch.chunk(hidden, 2, dim=-1)
        if (clamp := getattr(config, "activation_func_clamp_value", None)) is not None:
            gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(gate) * (linear + getattr(config, "glu_linear_offset", 0.0))

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = torch.ones_like(probs)
        if grouped_mm_usable(hidden):
            offsets = torch.cumsum(tokens_per_expert.to(hidden.device), dim=0).to(torch.int32)
            counts = None
        else:
            offsets, counts = None, [int(n) for n in tokens_per_expert.tolist()]
        fc1 = _grouped_linear(hidden, self.weight1, offsets, counts)
        if self.fc1_adapter is not None:
            fc1 = fc1 + self.fc1_adapter(hidden, tokens_per_expert)
        intermediate = self._activation(fc1)
        # As MLP.forward: scale by the routing probability before fc2, in the probabilities' dtype.
        intermediate = (intermediate * probs.unsqueeze(-1)).to(hidden.dtype)
        out = _grouped_linear(intermediate, self.weight2, offsets, counts)
        if self.fc2_adapter is not None:
            out = out + self.fc2_adapter(intermediate, tokens_per_expert)
        return out, None

    # --------------------------------------------------------------- checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """SequentialMLP's sharded state, one factory per stacked weight (optimizer state follows it)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_object_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if metadata.get("singleton_local_shards", False):
            raise NotImplementedError("GroupedGemmExperts: singleton_local_shards checkpoints are not supported")
        state = {}
        for name, weight, tp_axis in (("linear_fc1", self.weight1, 0), ("linear_fc2", self.weight2, 1)):
            glu = self.gated and name == "linear_fc1"
            state[f"{prefix}{'weight1' if name == 'linear_fc1' else 'weight2'}"] = ShardedTensorFactory(
                key=f"{prefix}experts.{name}.weight",
                data=weight,
                build_fn=lambda key, t, replica_id, flat, a=tp_axis, g=glu: self._expert_shards(
                    key, t, flat, a, g, sharded_offsets, metadata),
                merge_fn=lambda parts, g=glu: self._merge_expert_shards(parts, g),
                replica_id=(0, 0, self.dp_group.rank()),
            )
            adapter = self.fc1_adapter if name == "linear_fc1" else self.fc2_adapter
            for part, tensor in ({} if adapter is None else adapter.stacked_weights()).items():
                # What SequentialMLP writes for an adapter on each expert linear: a per-expert tensor,
                # split over expert TP where the linear is (fc1's B by rows, fc2's A by columns).
                split = tp_axis if part == ("linear_out.weight" if tp_axis == 0 else "linear_in.weight") else None
                split_glu = glu and split is not None
                state[f"{prefix}{'fc1' if name == 'linear_fc1' else 'fc2'}_adapter.{part}"] = ShardedTensorFactory(
                    key=f"{prefix}experts.{name}.adapter.{part}", data=tensor,
                    build_fn=lambda key, t, replica_id, flat, a=split, g=split_glu: self._expert_shards(
                        key, t, flat, a, g, sharded_offsets, metadata),
                    merge_fn=lambda parts, g=split_glu: self._merge_expert_shards(parts, g),
                    replica_id=(0, 0, self.dp_group.rank()),
                )
            for local, offsets in self._expert_offsets(sharded_offsets):
                # SequentialMLP's linears carry an (empty) extra state; keep the checkpoint identical.
                state[f"{prefix}local_experts.{local}.{name}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{name}._extra_state", offsets,
                    replica_id=(0, self.tp_group.rank(), self.dp_group.rank()),
                )
        return state

    def _expert_offsets(self, sharded_offsets):
        """(local index, sharded offsets with the global expert axis appended) for each local expert."""
        total = self.ep_group.size() * self.num_local_experts
        first = self.ep_group.rank() * self.num_local_experts
        for local in range(self.num_local_experts):
            yield local, (*sharded_offsets, (len(sharded_offsets), first + local, total))

    def _expert_shards(self, key, stacked, flattened_range, tp_axis, glu, sharded_offsets, metadata):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

        if flattened_range is not None:
            raise NotImplementedError("GroupedGemmExperts: flattened (fully_sharded_model_space) optimizer "
                                      "checkpoints are not supported; use dp_reshardable")
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        shards = []
        for local, offsets in self._expert_offsets(sharded_offsets):
            if tp_axis is None:  # replicated over expert TP (e.g. a LoRA A matrix)
                shard = make_sharded_tensor_for_checkpoint(
                    stacked[local], key, prepend_offsets=offsets,
                    replica_id=(0, self.tp_group.rank(), self.dp_group.rank()))
            else:
                shard = make_tp_sharded_tensor_for_checkpoint(
                    stacked[local], key, tp_axis, prepend_offsets=offsets, tp_group=self.tp_group,
                    dp_cp_group=metadata["dp_cp_group"],
                )
            shard.replica_id = (*shard.replica_id[:2], self.dp_group.rank())
            shards.extend(apply_swiglu_sharded_factory(shard, offsets).build() if glu else [shard])
        return shards

    @staticmethod
    def _merge_expert_shards(parts, glu: bool) -> torch.Tensor:
        if glu:  # [gate_0, up_0, gate_1, up_1, ...]
            parts = [torch.cat(parts[i : i + 2]) for i in range(0, len(parts), 2)]
        return torch.stack(parts)

    def _stack_per_expert_state(self, state_dict, prefix, *unused):
        """Accept SequentialMLP's per-expert keys; drop the extra-state placeholders."""
        per_expert: dict[str, dict[int, torch.Tensor]] = {"linear_fc1": {}, "linear_fc2": {}}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            match = _PER_EXPERT_KEY.fullmatch(key[len(prefix):])
            if match:
                value = state_dict.pop(key)
                if match.group(3) == "weight":
                    per_expert[match.group(2)][int(match.group(1))] = value
        for name, target in (("linear_fc1", "weight1"), ("linear_fc2", "weight2")):
            found = per_expert[name]
            if found:
                missing = sorted(set(range(self.num_local_experts)) - set(found))
                if missing:
                    raise KeyError(f"{prefix}local_experts.{missing[0]}.{name}.weight missing from the state dict")
                state_dict[f"{prefix}{target}"] = torch.stack([found[e] for e in range(self.num_local_experts)])
