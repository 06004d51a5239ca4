"""The Qwen3 / Qwen3-MoE weight mapping: HF names <-> Megatron-Core checkpoint keys.

The single source for the converter, LoRA export and tests. Megatron keys are
the torch_dist keys, which are the same for the local and the
Transformer-Engine layer specs (see ``builder.build_layer_spec``).
"""

from __future__ import annotations

from megatron_patch.models.qwen3.arch import Qwen3Arch, padded_vocab_size
from megatron_patch.models.weight_mapping import (
    BoundMapping,
    FuseGateUp,
    FuseQKV,
    PadRows,
    WeightMapping,
    bind,
)

_L = "model.layers.{layer}."
_M = "decoder.layers."


def qwen3_weight_mappings(arch: Qwen3Arch) -> list[WeightMapping]:
    vocab = PadRows(arch.vocab_size, padded_vocab_size(arch.vocab_size))
    gate_up = FuseGateUp()
    rows = [
        WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab),
        WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
        WeightMapping(_M + "self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",)),
        WeightMapping(
            _M + "self_attention.linear_qkv.weight",
            (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
            FuseQKV(arch.num_attention_heads, arch.num_query_groups, arch.head_dim),
        ),
        WeightMapping(_M + "self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",)),
        WeightMapping(_M + "self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",)),
        WeightMapping(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",)),
        # Dense MLP layers: the norm is fused into fc1 under Transformer-Engine naming.
        WeightMapping(_M + "mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",), layers="dense"),
        WeightMapping(
            _M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), gate_up, layers="dense"
        ),
        WeightMapping(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), layers="dense"),
        # MoE layers: separate pre-MLP norm, router, per-expert SwiGLU.
        WeightMapping(_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",), layers="moe"),
        WeightMapping(_M + "mlp.router.weight", (_L + "mlp.gate.weight",), layers="moe"),
        WeightMapping(
            _M + "mlp.experts.experts.linear_fc1.weight",
            (_L + "mlp.experts.{expert}.gate_proj.weight", _L + "mlp.experts.{expert}.up_proj.weight"),
            gate_up,
            layers="moe",
        ),
        WeightMapping(
            _M + "mlp.experts.experts.linear_fc2.weight", (_L + "mlp.experts.{expert}.down_proj.weight",), layers="moe"
        ),
    ]
    if not arch.tie_word_embeddings:
        rows.insert(2, WeightMapping("output_layer.weight", ("lm_head.weight",), vocab))
    return rows


def bound_qwen3_mappings(arch: Qwen3Arch) -> list[BoundMapping]:
    """The mapping expanded over every layer and expert of ``arch``."""
    return bind(qwen3_weight_mappings(arch), arch.num_layers, arch.num_experts, arch.layer_is_moe)
