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

import torch

from megatron_patch.models.experts import _grouped_linear, grouped_mm_usable


def _seeded(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _init_a(shape, name: str, seed: int) -> torch.Tensor:
    weight = torch.empty(shape)
    # nn.Linear's (and PEFT's) default for A.
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=_seeded(name, seed))
    return weight


class _Matrix(torch.nn.Module):
    """One factor, applied through its own forward: Megatron-Core DDP's overlapped parameter
    all-gather runs as a forward pre-hook of the module that owns a parameter, so the weight must
    be used by calling this module, never read from outside it."""

    def __init__(self, data: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(data)

    def forward(self, x: torch.Tensor, offsets=None, counts=None) -> torch.Tensor:
        if self.weight.dim() == 2:
            return torch.nn.functional.linear(x, self.weight)
        return _grouped_linear(x, self.weight, offsets, counts)


class LoraAdapter(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float,
                 name: str, seed: int, dtype: torch.dtype, device):
        super().__init__()
        self.scale = scale
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.linear_in = _Matrix(_init_a((rank, in_features), name, seed).to(device=device, dtype=dtype))
        self.linear_out = _Matrix(torch.zeros(out_features, rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.linear_in(self.dropout(x))) * self.scale


class GroupedLoraAdapter(torch.nn.Module):
    def __init__(self, experts: int, in_features: int, out_features: int, rank: int, scale: float, dropout: float,
                 names: list[str], seed: int, dtype: torch.dtype, device):
        super().__init__()
        self.scale = scale
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        a = torch.stack([_init_a((rank, in_features), name, seed) for name in names])
        self.linear_in = _Matrix(a.to(device=device, dtype=dtype))
        self.linear_out = _Matrix(torch.zeros(experts, out_features, rank, device=device, dtype=dtype))

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
