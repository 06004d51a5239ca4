"""Qwen3Arch -> Megatron-Core ``TransformerConfig``, layer spec and ``GPTModel``.

Everything here is stock Megatron-Core; what this module decides is the
Qwen3-specific settings (which TransformerConfig defaults are wrong for Qwen3)
and one key-name fix so local-spec and Transformer-Engine-spec checkpoints are
interchangeable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_patch.models.attention import SdpaAttention
from megatron_patch.models.choices import PRECISIONS, resolve_transformer_impl
from megatron_patch.models.experts import GroupedGemmExperts
from megatron_patch.models.qwen3.arch import Qwen3Arch, padded_vocab_size
from megatron_patch.parallel import ParallelLayout
from megatron_patch.patches.compat import replace_spec, spec_module, spec_submodules


@dataclass(frozen=True)
class BuildOptions:
    """How to instantiate a model (as opposed to what the model is: ``Qwen3Arch``)."""

    layout: ParallelLayout = ParallelLayout()
    precision: str = "fp32"
    transformer_impl: str = "auto"  # see TRANSFORMER_IMPLS
    moe_dispatcher: str = "alltoall"
    moe_router_dtype: str | None = "fp32"
    recompute: str | None = None  # None, "selective" or "full"
    recompute_num_layers: int = 1
    cpu_initialization: bool | None = None  # None: when there is no CUDA
    # None: keep the HF coefficient; 0 disables the aux loss (e.g. for parity checks).
    aux_loss_coeff: float | None = None

    def resolved_impl(self) -> str:
        return resolve_transformer_impl(self.transformer_impl)

    def resolved_use_te(self) -> bool:
        return self.resolved_impl() == "transformer_engine"


def build_transformer_config(arch: Qwen3Arch, options: BuildOptions = BuildOptions(), **overrides):
    """The ``TransformerConfig`` that reproduces ``arch`` in Megatron-Core. ``overrides`` win."""
    from megatron.core.transformer import TransformerConfig

    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {options.precision!r}")
    dtype = PRECISIONS[options.precision]
    layout = options.layout
    cpu_init = not torch.cuda.is_available() if options.cpu_initialization is None else options.cpu_initialization
    use_te = options.resolved_use_te()
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        **layout.megatron_sizes(),
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=cpu_init,
        # Fused kernels need Transformer-Engine or apex; the local path keeps them off.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if use_te and importlib.util.find_spec("transformer_engine.pytorch.cross_entropy") is not None:
        # TE's fused vocabulary-parallel cross entropy writes the gradient into the bf16 logits instead of
        # keeping an fp32 softmax and an fp32 gradient beside them: for A3B, 1.2 instead of 5.9 GiB at the
        # loss of a 4096-token micro-batch (training/activations.py plans it so). Not run here: no TE.
        fields.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    if layout.virtual_pp:
        # As Megatron-LM does for the interleaved schedule. With batched p2p and PP=2 the previous and
        # next stage are the same rank, and an activation and a gradient of the same shape can be
        # matched to each other's receive (seen on gloo: wrong losses, no error); the unbatched ops
        # send the two directions over different groups.
        fields.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if options.recompute:
        fields.update(recompute_granularity=options.recompute)
        if options.recompute == "full":
            fields.update(recompute_method="uniform", recompute_num_layers=options.recompute_num_layers)
    if arch.is_moe:
        pattern = arch.moe_layer_pattern
        aux = arch.router_aux_loss_coef if options.aux_loss_coeff is None else options.aux_loss_coeff
        fields.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            # HF: softmax over all experts, top-k, renormalise if norm_topk_prob.
            # Megatron with pre_softmax=False: top-k on logits, softmax over the k,
            # which equals the renormalised path; pre_softmax=True is the other.
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
            moe_aux_loss_coeff=aux,
            moe_router_dtype=options.moe_router_dtype,
            moe_token_dispatcher_type=options.moe_dispatcher,
            moe_grouped_gemm=use_te,
            moe_permute_fusion=False,
            # An int keeps homogeneous layers stacked under one checkpoint key;
            # Megatron-Core switches to per-layer keys for a list.
            moe_layer_freq=1 if all(pattern) else [int(p) for p in pattern],
        )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_layer_spec(config, transformer_impl: str, vp_stage: int | None = None):
    """Megatron-Core's decoder block spec for this pipeline stage, with TE-compatible checkpoint keys.

    ``transformer_impl`` "torch" swaps our SDPA attention and grouped-GEMM experts into the local
    spec; both keep the local spec's parameter layout on disk.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    use_te = transformer_impl == "transformer_engine"
    block = get_gpt_decoder_block_spec(
        config=config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
    )
    if use_te:
        return block
    # The local spec maps pre_mlp_layernorm onto the fused TE key of a dense MLP
    # (mlp.linear_fc1.layer_norm_weight) for MoE layers too, but the TE MoE spec
    # keeps a separate pre_mlp_layernorm. Drop that entry for MoE layers so a
    # checkpoint means the same under both specs (megatron-core 0.16.1, 0.19.x).
    fixed = []
    for spec in block.layer_specs:
        submodules = spec.submodules
        if spec_module(submodules.mlp) is MoELayer and "pre_mlp_layernorm." in submodules.sharded_state_dict_keys_map:
            keys_map = dict(submodules.sharded_state_dict_keys_map)
            keys_map.pop("pre_mlp_layernorm.")
            submodules = dataclasses.replace(submodules, sharded_state_dict_keys_map=keys_map)
        if transformer_impl == "torch":
            submodules = _with_torch_kernels(submodules)
        fixed.append(dataclasses.replace(spec, submodules=submodules))
    block.layer_specs = fixed
    return block


def _with_torch_kernels(layer):
    """A local-spec layer's submodules with SdpaAttention and, for MoE layers, GroupedGemmExperts."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    attention = layer.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SdpaAttention)
    )
    mlp = layer.mlp
    moe = spec_submodules(mlp)
    if spec_module(mlp) is MoELayer and spec_module(moe.experts) is SequentialMLP:
        experts = replace_spec(moe.experts, module=GroupedGemmExperts)
        mlp = replace_spec(mlp, submodules=dataclasses.replace(moe, experts=experts))
    return dataclasses.replace(layer, self_attention=attention, mlp=mlp)


def build_gpt_model(arch: Qwen3Arch, options: BuildOptions = BuildOptions(), vp_stage: int | None = None,
                    **config_overrides):
    """One Megatron-Core ``GPTModel`` chunk of ``arch`` for this rank's pipeline stage.

    Needs ``megatron_patch.parallel.initialize_parallel`` to have run.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = build_transformer_config(arch, options, **config_overrides)
    spec = build_layer_spec(config, options.resolved_impl(), vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch.vocab_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
        vp_stage=vp_stage,
    )
