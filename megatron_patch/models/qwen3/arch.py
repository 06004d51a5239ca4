"""The architecture of a Qwen3 / Qwen3-MoE model as one typed value.

``Qwen3Arch`` is what every other part of the kit reads: the Megatron-Core
builder, the weight mapping, the converter and the presets. It is made from an
HF ``config.json`` (transformers 4.x and 5.x spellings) and written back to one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_patch.errors import InputError

DENSE_ARCHITECTURE = "Qwen3ForCausalLM"
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"
_MODEL_TYPES = {DENSE_ARCHITECTURE: "qwen3", MOE_ARCHITECTURE: "qwen3_moe"}


class ConfigError(InputError):
    """An HF config that does not describe a supported Qwen3 model."""



# The types of the config.json fields read here (a wrong one would surface later as a TypeError).
_INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "max_position_embeddings", "num_experts", "num_local_experts",
               "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
_NUMBER_FIELDS = ("rms_norm_eps", "rope_theta", "router_aux_loss_coef", "initializer_range")
_BOOL_FIELDS = ("tie_word_embeddings", "norm_topk_prob")


def _check_field_types(config: dict, source: str) -> None:
    """One line naming the first field of the wrong JSON type (null means absent)."""
    for names, wanted, ok in ((_INT_FIELDS, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                              (_NUMBER_FIELDS, "a number",
                               lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
                              (_BOOL_FIELDS, "true or false", lambda v: isinstance(v, bool))):
        for name in names:
            value = config.get(name)
            if value is not None and not ok(value):
                raise ConfigError(f"{source}: {name} must be {wanted}, got {value!r}")
    layers = config.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(isinstance(n, int) for n in layers)):
        raise ConfigError(f"{source}: mlp_only_layers must be a list of layer numbers, got {layers!r}")


@dataclass(frozen=True)
class Qwen3Arch:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int = 151936
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Mixture of experts; num_experts == 0 means a dense Qwen3.
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    # Layers (0-based) whose MLP is dense in an MoE model (HF ``mlp_only_layers``).
    dense_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    extra_hf_fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_query_groups}"
            )
        if self.is_moe and not (0 < self.moe_topk <= self.num_experts):
            raise ConfigError(f"num_experts_per_tok={self.moe_topk} must be in 1..num_experts={self.num_experts}")
        if self.is_moe and self.moe_ffn_hidden_size <= 0:
            raise ConfigError("an MoE config needs moe_intermediate_size > 0")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers {bad} are outside 0..{self.num_layers - 1}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def architecture(self) -> str:
        return MOE_ARCHITECTURE if self.is_moe else DENSE_ARCHITECTURE

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def layer_is_moe(self, layer: int) -> bool:
        """HF Qwen3-MoE's rule for a sparse layer."""
        return (
            self.is_moe
            and layer not in self.dense_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layer_pattern(self) -> tuple[bool, ...]:
        return tuple(self.layer_is_moe(i) for i in range(self.num_layers))

    SHAPE_FIELDS = (
        "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "head_dim", "ffn_hidden_size",
        "vocab_size", "tie_word_embeddings", "num_experts", "moe_topk", "moe_ffn_hidden_size", "dense_layers",
        "decoder_sparse_step",
    )

    def shape_differences(self, other: Qwen3Arch) -> list[str]:
        """Fields that change tensor shapes or layer structure and differ, as 'name: mine != other'."""
        return [
            f"{name}: {getattr(self, name)} != {getattr(other, name)}"
            for name in self.SHAPE_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]

    def replace(self, **changes) -> Qwen3Arch:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config") -> Qwen3Arch:
        """Read a ``config.json`` dict of Qwen3ForCausalLM or Qwen3MoeForCausalLM."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object of settings, got {type(config).__name__}")
        _check_field_types(config, source)
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
        known = [a for a in architectures if a in _MODEL_TYPES]
        if not known and model_type not in _MODEL_TYPES.values():
            raise ConfigError(
                f"{source}: unsupported architecture {architectures or model_type!r}; "
                f"expected {DENSE_ARCHITECTURE} or {MOE_ARCHITECTURE}"
            )
        is_moe = (known[0] == MOE_ARCHITECTURE) if known else model_type == "qwen3_moe"

        def need(*names):
            for name in names:
                if config.get(name) is not None:
                    return config[name]
            raise ConfigError(f"{source}: missing field {' / '.join(names)}")

        rope_parameters = config.get("rope_parameters") or {}
        rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta"))
        if rope_theta is None:
            raise ConfigError(f"{source}: missing field rope_theta / rope_parameters.rope_theta")
        rope_scaling = config.get("rope_scaling") or {}
        rope_type = (rope_scaling.get("rope_type", rope_scaling.get("type"))
                     or rope_parameters.get("rope_type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope scaling {rope_type!r} is not supported yet")
        if config.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not a Qwen3 configuration")
        if config.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act={hidden_act!r}; Qwen3 uses silu")

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        moe_fields = {}
        if is_moe:
            moe_fields = dict(
                num_experts=need("num_experts", "num_local_experts"),
                moe_topk=need("num_experts_per_tok"),
                moe_ffn_hidden_size=need("moe_intermediate_size"),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
                dense_layers=tuple(config.get("mlp_only_layers") or ()),
                decoder_sparse_step=int(config.get("decoder_sparse_step", 1) or 1),
            )
        consumed = _CONSUMED_HF_FIELDS
        return cls(
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_query_groups=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            ffn_hidden_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            max_position_embeddings=config.get("max_position_embeddings", 40960),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            initializer_range=float(config.get("initializer_range", 0.02)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            extra_hf_fields={k: v for k, v in config.items() if k not in consumed},
            **moe_fields,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Qwen3Arch:
        config_path = Path(path) / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{config_path}: not found (expected an HF model directory)") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config_path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        return cls.from_hf_config(config, source=str(config_path))

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict in the transformers 4.x spelling, which 4.51+ and 5.x both read."""
        config: dict[str, Any] = dict(self.extra_hf_fields)
        config.update(
            architectures=[self.architecture],
            model_type=_MODEL_TYPES[self.architecture],
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.head_dim,
            intermediate_size=self.ffn_hidden_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            use_sliding_window=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.is_moe:
            config.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.moe_topk,
                moe_intermediate_size=self.moe_ffn_hidden_size,
                norm_topk_prob=self.norm_topk_prob,
                router_aux_loss_coef=self.router_aux_loss_coef,
                mlp_only_layers=list(self.dense_layers),
                decoder_sparse_step=self.decoder_sparse_step,
            )
        config.pop("num_local_experts", None)
        config.pop("rope_parameters", None)
        return config

    # --------------------------------------------------------------- parameters

    def parameter_counts(self) -> dict[str, int]:
        """Exact parameter counts of the HF model (unpadded vocab): total and active per token."""
        h, hd = self.hidden_size, self.head_dim
        attention = h * hd * (self.num_attention_heads * 2 + self.num_query_groups * 2) + 2 * hd
        norms = 2 * h
        dense_mlp = 3 * h * self.ffn_hidden_size
        expert = 3 * h * self.moe_ffn_hidden_size
        total = active = 0
        for layer in range(self.num_layers):
            total += attention + norms
            active += attention + norms
            if self.layer_is_moe(layer):
                router = self.num_experts * h
                total += router + self.num_experts * expert
                active += router + self.moe_topk * expert
            else:
                total += dense_mlp
                active += dense_mlp
        embedding = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else embedding
        total += embedding + head + h
        active += embedding + head + h
        return {"total": total, "active": active, "embedding": embedding, "output_layer": head}


# Megatron-LM's default; the padded size depends only on the vocabulary, not on
# TP, so a checkpoint written at one TP loads at another (151936 = 128 * 1187).
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple


_CONSUMED_HF_FIELDS = frozenset(
    """architectures model_type hidden_size num_hidden_layers num_attention_heads num_key_value_heads
    head_dim intermediate_size vocab_size max_position_embeddings rms_norm_eps rope_theta rope_parameters
    rope_scaling tie_word_embeddings initializer_range num_experts num_local_experts num_experts_per_tok
    moe_intermediate_size norm_topk_prob router_aux_loss_coef mlp_only_layers decoder_sparse_step
    bos_token_id eos_token_id hidden_act attention_bias attention_dropout use_sliding_window""".split()
)
