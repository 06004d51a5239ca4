"""LoRA settings and target names.

Targets are Megatron-Core's linear modules. Megatron fuses q/k/v into ``linear_qkv`` and gate/up
into ``linear_fc1``, so an HF name selects the fused module that holds it: ``q_proj`` (or k/v)
adapts all of ``linear_qkv`` with one adapter, as Megatron-Bridge's default LoRA does.
``linear_fc1``/``linear_fc2`` cover dense MLPs and every routed expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patch.errors import InputError

MEGATRON_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
HF_ALIASES = {
    "q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
    "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2",
}


class LoraConfigError(InputError):
    """Invalid LoRA settings; the message names the setting."""


def parse_targets(names) -> tuple[str, ...]:
    """Megatron target names, in canonical order, from Megatron or HF names ("all" = every target)."""
    chosen = set()
    for name in names:
        if name == "all":
            chosen.update(MEGATRON_TARGETS)
        elif name in MEGATRON_TARGETS:
            chosen.add(name)
        elif name in HF_ALIASES:
            chosen.add(HF_ALIASES[name])
        else:
            known = ", ".join((*MEGATRON_TARGETS, *HF_ALIASES, "all"))
            raise LoraConfigError(f"--lora-target-modules: unknown module {name!r} (known: {known})")
    if not chosen:
        raise LoraConfigError("--lora-target-modules: no module given")
    return tuple(t for t in MEGATRON_TARGETS if t in chosen)


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = MEGATRON_TARGETS
    seed: int = 1234

    def __post_init__(self):
        if self.rank < 1:
            raise LoraConfigError(f"--lora-rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def describe(self) -> dict:
        """What a checkpoint records about its adapters."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


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
