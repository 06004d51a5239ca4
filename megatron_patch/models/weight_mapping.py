"""Declarative HF <-> Megatron-Core weight mappings, usable in both directions.

A model's mapping is a list of ``WeightMapping`` rows: a Megatron checkpoint
key, the HF name templates it is made from, and a ``Transform``. Megatron
tensors are addressed as in a torch_dist checkpoint, independent of any
parallel layout: the stacked key (``decoder.layers.mlp.router.weight``) plus
the global layer and expert index. How a full tensor is cut for a rank
(TP/PP/EP/ETP) is not the mapping's business: Megatron-Core's
``sharded_state_dict`` says that, see ``sharded_state.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_patch.errors import InputError


@dataclass(frozen=True, order=True)
class MegatronAddress:
    """A full (unsharded) Megatron tensor: checkpoint key + global layer / expert index."""

    key: str
    layer: int | None = None
    expert: int | None = None

    def __str__(self) -> str:
        parts = [self.key]
        if self.layer is not None:
            parts.append(f"layer {self.layer}")
        if self.expert is not None:
            parts.append(f"expert {self.expert}")
        return ", ".join(parts)


class Transform(Protocol):
    """Fuses HF tensors into one Megatron tensor and splits it back."""

    def to_megatron(self, hf: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def to_hf(self, megatron: torch.Tensor) -> list[torch.Tensor]: ...


class Identity:
    def to_megatron(self, hf):
        (tensor,) = hf
        return tensor

    def to_hf(self, megatron):
        return [megatron]


@dataclass(frozen=True)
class PadRows:
    """Vocabulary padding: zero rows appended up to ``padded_rows`` (embedding, output layer)."""

    rows: int
    padded_rows: int

    def to_megatron(self, hf):
        (tensor,) = hf
        if tensor.shape[0] == self.padded_rows:
            return tensor
        pad = tensor.new_zeros((self.padded_rows - tensor.shape[0], *tensor.shape[1:]))
        return torch.cat([tensor, pad])

    def to_hf(self, megatron):
        return [megatron[: self.rows]]


@dataclass(frozen=True)
class FuseQKV:
    """q, k, v -> Megatron's per-query-group layout [q_g0 (heads/groups heads), k_g0, v_g0, q_g1, ...].

    Per-group interleaving makes a TP split along dim 0 hand each rank whole groups.
    """

    num_heads: int
    num_groups: int
    head_dim: int

    def to_megatron(self, hf):
        q, k, v = hf
        hidden = q.shape[-1]
        per_group = self.num_heads // self.num_groups * self.head_dim
        q = q.reshape(self.num_groups, per_group, hidden)
        k = k.reshape(self.num_groups, self.head_dim, hidden)
        v = v.reshape(self.num_groups, self.head_dim, hidden)
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)

    def to_hf(self, megatron):
        hidden = megatron.shape[-1]
        per_group = self.num_heads // self.num_groups * self.head_dim
        grouped = megatron.reshape(self.num_groups, per_group + 2 * self.head_dim, hidden)
        q, k, v = torch.split(grouped, [per_group, self.head_dim, self.head_dim], dim=1)
        return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]


class FuseGateUp:
    """gate, up -> [gate; up]: Megatron's GLU takes act(first half) * second half."""

    def to_megatron(self, hf):
        gate, up = hf
        return torch.cat([gate, up], dim=0)

    def to_hf(self, megatron):
        gate, up = torch.chunk(megatron, 2, dim=0)
        return [gate, up]


IDENTITY = Identity()
_PLACEHOLDER = re.compile(r"\{(layer|expert)\}")


@dataclass(frozen=True)
class WeightMapping:
    """One row of a model's mapping. HF templates may use ``{layer}`` and ``{expert}``."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform = IDENTITY
    # Which decoder layers the row applies to: "all", "moe" or "dense".
    layers: str = "all"

    @property
    def scope(self) -> str:
        found = {m for template in self.hf for m in _PLACEHOLDER.findall(template)}
        return "expert" if "expert" in found else "layer" if "layer" in found else "model"


@dataclass(frozen=True)
class BoundMapping:
    """A mapping row at one layer / expert: concrete names on both sides."""

    address: MegatronAddress
    hf_names: tuple[str, ...]
    transform: Transform

    def to_megatron(self, read_hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
        return self.transform.to_megatron([read_hf(name) for name in self.hf_names])

    def to_hf(self, megatron: torch.Tensor) -> dict[str, torch.Tensor]:
        tensors = self.transform.to_hf(megatron)
        return {name: t.contiguous() for name, t in zip(self.hf_names, tensors, strict=True)}


def bind(
    rows: Iterable[WeightMapping],
    num_layers: int,
    num_experts: int,
    layer_is_moe: Callable[[int], bool],
) -> list[BoundMapping]:
    """Expand rows over layers and experts, in checkpoint order (model rows, then layer by layer)."""
    rows = list(rows)
    bound = [BoundMapping(MegatronAddress(r.megatron), r.hf, r.transform) for r in rows if r.scope == "model"]
    for layer in range(num_layers):
        kind = "moe" if layer_is_moe(layer) else "dense"
        for row in rows:
            if row.scope == "model" or row.layers not in ("all", kind):
                continue
            experts = range(num_experts) if row.scope == "expert" else [None]
            for expert in experts:
                names = tuple(t.format(layer=layer, expert=expert) for t in row.hf)
                bound.append(BoundMapping(MegatronAddress(row.megatron, layer, expert), names, row.transform))
    return bound


class MappingError(InputError):
    """HF tensors that do not match what the mapping expects."""


def check_hf_names(bound: Sequence[BoundMapping], hf_names: Iterable[str], source: str = "checkpoint") -> None:
    """Every HF tensor is used exactly once, and every tensor the mapping needs is present."""
    expected: dict[str, MegatronAddress] = {}
    for b in bound:
        for name in b.hf_names:
            if name in expected:
                raise MappingError(f"mapping uses HF tensor {name} twice ({expected[name]} and {b.address})")
            expected[name] = b.address
    present = set(hf_names)
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MappingError(f"{source}: missing tensor {missing[0]}{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MappingError(f"{source}: unexpected tensor {extra[0]}{more}")


def megatron_tensors_from_hf(
    bound: Sequence[BoundMapping], read_hf: Callable[[str], torch.Tensor]
) -> Iterator[tuple[MegatronAddress, torch.Tensor]]:
    for b in bound:
        yield b.address, b.to_megatron(read_hf)


def hf_tensors_from_megatron(
    bound: Sequence[BoundMapping], read_megatron: Callable[[MegatronAddress], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    for b in bound:
        yield from b.to_hf(read_megatron(b.address)).items()
