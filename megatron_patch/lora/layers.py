"""Low-rank adapters: delta(x) = scale * B(A(dropout(x))), B zero at start so training starts from the base.

``LoraAdapter`` sits on one Megatron linear (parameters ``linear_in.weight`` = A [r, in] and
``linear_out.weight`` = B [out, r], Megatron-Bridge's names). ``GroupedLoraAdapter`` holds one
adapter per local expert, stacked ([experts, r, in], [experts, out, r]), for
``GroupedGemmExperts``. A is initialised from a generator seeded by the adapter's global name
(layer and expert numbers counted over the whole model), so every layout (EP, PP, DP) starts
from the same adapters.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from megatron_patch.models.experts import _grouped_linear, grouped_mm_usable


def _seeded(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _init_a(shape, name: str, seed: int) -> torch.Tensor:
    weight = torch.empty(shape)
    # nn.Linear's (and PEFT's) default for A.
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=_seeded(name, seed))
    return weight


class _SumGradient(torch.autograd.Function):
    """Identity forward; the gradient summed over ``group`` backward."""

    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _Matrix(torch.nn.Module):
    """One factor, applied through its own forward: Megatron-Core DDP's overlapped parameter
    all-gather runs as a forward pre-hook of the module that owns a parameter, so the weight must
    be used by calling this module, never read from outside it.

    ``grad_sum_group``: for a factor replicated over expert-TP ranks whose gradient each rank
    sees only in part (the other factor is sharded there); its gradient is summed over the group.
    """

    def __init__(self, data: torch.Tensor, grad_sum_group=None):
        super().__init__()
        self.weight = torch.nn.Parameter(data)
        self.grad_sum_group = grad_sum_group if grad_sum_group is not None and grad_sum_group.size() > 1 else None

    def forward(self, x: torch.Tensor, offsets=None, counts=None) -> torch.Tensor:
        weight = self.weight if self.grad_sum_group is None else _SumGradient.apply(self.weight, self.grad_sum_group)
        if weight.dim() == 2:
            return torch.nn.functional.linear(x, weight)
        return _grouped_linear(x, weight, offsets, counts)


@dataclass(frozen=True)
class TpSplit:
    """How the adapted linear is split over tensor-parallel ranks, and so its adapter.

    Column-parallel linear (qkv, fc1; rows split): A whole on every rank, B split like the rows.
    Row-parallel linear (proj, fc2; columns split): A split like the columns, B whole.
    Expert linears leave communication to the token dispatcher (it gathers tokens over expert-TP
    ranks and sums their partial outputs), so their adapters only sum the gradient of the whole
    factor over the group; dense linears communicate themselves, and so do their adapters.
    """

    kind: str = "none"  # "column", "row" or "none"
    group: object = None  # the linear's tensor-parallel group (expert-TP for experts)
    sequence_parallel: bool = False
    expert: bool = False

    @property
    def size(self) -> int:
        return 1 if self.group is None else self.group.size()

    @property
    def rank(self) -> int:
        return 0 if self.group is None else self.group.rank()

    def local(self, in_features: int, out_features: int) -> tuple[int, int]:
        """The local (in, out) of a linear whose global features are given."""
        if self.kind == "column":
            return in_features, out_features // self.size
        if self.kind == "row":
            return in_features // self.size, out_features
        return in_features, out_features

    def whole(self, in_local: int, out_local: int) -> tuple[int, int]:
        """The global (in, out) of a linear whose local features are given."""
        if self.kind == "column":
            return in_local, out_local * self.size
        if self.kind == "row":
            return in_local * self.size, out_local
        return in_local, out_local

    def local_a(self, a: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole A [.., r, in]."""
        if self.kind != "row" or self.size == 1:
            return a
        width = a.shape[-1] // self.size
        return a[..., self.rank * width:(self.rank + 1) * width].clone()

    def grad_sum_groups(self):
        """(A's, B's) group over which an expert adapter's gradient is summed."""
        if not self.expert or self.size == 1:
            return None, None
        return (self.group, None) if self.kind == "column" else (None, self.group)

    def mark(self, a: torch.nn.Parameter, b: torch.nn.Parameter) -> None:
        """Megatron's parameter attributes: the split factor is tensor-parallel (the gradient norm
        counts every rank's part, not rank 0's only); with sequence parallelism each rank sees
        part of the tokens, so a dense whole factor's gradient is summed over TP, as for norm weights."""
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        if self.kind == "none":
            return
        split, whole = (b, a) if self.kind == "column" else (a, b)
        axis = (0 if self.kind == "column" else 1) + (split.dim() - 2)  # stacked experts: one axis later
        set_tensor_model_parallel_attributes(split, is_parallel=True, dim=axis, stride=1)
        if self.expert:
            # Megatron-Core 0.16.1 filters gradient-norm duplicates by the dense TP rank, also for
            # expert parameters (it has no expert parameter replicated over expert TP): count the
            # whole factor where it lives, once per expert-TP group.
            whole.tensor_model_parallel = True
            whole.shared = self.rank != 0
        elif self.sequence_parallel and self.size > 1:
            whole.sequence_parallel = True

    def combine(self, hidden: torch.Tensor) -> torch.Tensor:
        """A's output as B's input: gathered (column) or summed (row) over TP for dense linears."""
        if self.expert or self.size == 1 or self.kind == "none":
            return hidden
        from megatron.core.tensor_parallel import mappings

        if self.kind == "column":
            if self.sequence_parallel:
                return mappings.gather_from_sequence_parallel_region(hidden, group=self.group)
            return mappings.copy_to_tensor_model_parallel_region(hidden, group=self.group)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(hidden, group=self.group)
        return mappings.reduce_from_tensor_model_parallel_region(hidden, group=self.group)


class LoraAdapter(torch.nn.Module):
    """The adapter of one linear; ``in_features``/``out_features`` are the linear's global sizes."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float,
                 name: str, seed: int, dtype: torch.dtype, device, split: TpSplit = TpSplit()):
        super().__init__()
        self.scale, self.split = scale, split
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        _, out_local = split.local(in_features, out_features)
        a_group, b_group = split.grad_sum_groups()
        a = split.local_a(_init_a((rank, in_features), name, seed))
        self.linear_in = _Matrix(a.to(device=device, dtype=dtype), a_group)
        self.linear_out = _Matrix(torch.zeros(out_local, rank, device=device, dtype=dtype), b_group)
        split.mark(self.linear_in.weight, self.linear_out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.split.combine(self.linear_in(self.dropout(x)))) * self.scale


class GroupedLoraAdapter(torch.nn.Module):
    """One adapter per local expert, stacked; sizes are one expert linear's global sizes."""

    def __init__(self, experts: int, in_features: int, out_features: int, rank: int, scale: float, dropout: float,
                 names: list[str], seed: int, dtype: torch.dtype, device, split: TpSplit = TpSplit()):
        super().__init__()
        self.scale, self.split = scale, split
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        _, out_local = split.local(in_features, out_features)
        a_group, b_group = split.grad_sum_groups()
        a = split.local_a(torch.stack([_init_a((rank, in_features), name, seed) for name in names]))
        self.linear_in = _Matrix(a.to(device=device, dtype=dtype), a_group)
        self.linear_out = _Matrix(torch.zeros(experts, out_local, rank, device=device, dtype=dtype), b_group)
        split.mark(self.linear_in.weight, self.linear_out.weight)

    def stacked_weights(self) -> dict[str, torch.Tensor]:
        return {"linear_in.weight": self.linear_in.weight, "linear_out.weight": self.linear_out.weight}

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        rank = self.linear_in.weight.shape[1]
        # grouped_mm wants 16-byte aligned rows: rank a multiple of 8 in bf16.
        if grouped_mm_usable(x) and rank % 8 == 0:
            offsets = torch.cumsum(tokens_per_expert.to(x.device), dim=0).to(torch.int32)
            counts = None
        else:
            offsets, counts = None, [int(n) for n in tokens_per_expert.tolist()]
        hidden = self.linear_in(self.dropout(x), offsets, counts)
        return self.linear_out(hidden, offsets, counts) * self.scale
