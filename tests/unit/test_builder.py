import pytest

from megatron_patch.models.qwen3.arch import padded_vocab_size
from megatron_patch.models.qwen3.builder import (
    BuildOptions,
    build_gpt_model,
    build_transformer_config,
)
from megatron_patch.models.qwen3.presets import PRESETS, get_preset
from megatron_patch.models.sharded_state import local_shards
from tests.conftest import PARITY_CONFIGS


@pytest.mark.parametrize("name", ["A3B", "A22B", "0.6B", "32B"])
def test_transformer_config_of_published_sizes(name):
    arch = PRESETS[name]
    config = build_transformer_config(arch)
    assert config.kv_channels == 128 and config.num_query_groups == arch.num_query_groups
    assert config.normalization == "RMSNorm" and config.gated_linear_unit and config.qk_layernorm
    assert not config.add_bias_linear and config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    assert config.layernorm_epsilon == 1e-6
    if arch.is_moe:
        assert config.num_moe_experts == 128 and config.moe_router_topk == 8
        assert config.moe_router_pre_softmax is False  # norm_topk_prob=true
        assert config.moe_aux_loss_coeff == 0.001 and config.moe_layer_freq == 1


def test_norm_topk_prob_false_maps_to_pre_softmax():
    config = build_transformer_config(get_preset("tiny-moe").replace(norm_topk_prob=False))
    assert config.moe_router_pre_softmax is True


def test_padded_vocab_does_not_depend_on_tp():
    assert padded_vocab_size(151936) == 151936
    assert padded_vocab_size(500) == 512


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_model_parameters_equal_the_architecture(name, megatron_world):
    arch = PARITY_CONFIGS[name]
    model = build_gpt_model(arch)
    padding = padded_vocab_size(arch.vocab_size) - arch.vocab_size
    per_vocab_row = arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    assert sum(p.numel() for p in model.parameters()) == arch.parameter_counts()["total"] + padding * per_vocab_row


def test_checkpoint_keys_are_transformer_engine_names(megatron_world):
    arch = PARITY_CONFIGS["moe-mqa-mixed-tied"]  # layer 1 dense, others MoE
    keys = {(a.key, a.layer) for a, _ in local_shards(build_gpt_model(arch))}
    # MoE layers keep a separate pre-MLP norm, as the TE MoE spec does ...
    assert ("decoder.layers.pre_mlp_layernorm.weight", 0) in keys
    # ... dense layers fuse it into fc1, as TE's LayerNormColumnParallelLinear does.
    assert ("decoder.layers.mlp.linear_fc1.layer_norm_weight", 1) in keys
    assert ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", 0) in keys
    assert not any("input_layernorm" in key for key, _ in keys)


def test_bad_precision_is_rejected():
    with pytest.raises(ValueError, match="precision must be one of"):
        build_transformer_config(get_preset("tiny-dense"), BuildOptions(precision="fp64"))


def test_inspect_cli(capsys, tmp_path):
    from megatron_patch.models.qwen3.__main__ import main
    from megatron_patch.models.qwen3.hf_model import hf_config

    assert main(["A3B"]) == 0
    assert "30,532,122,624 total, 3,353,032,704 active" in capsys.readouterr().out
    hf_config(get_preset("tiny-moe")).save_pretrained(tmp_path)
    assert main([str(tmp_path), "--json"]) == 0
    assert '"num_moe_experts": 8' in capsys.readouterr().out
    assert main(["no-such-size"]) == 2
    assert "unknown model size 'no-such-size'" in capsys.readouterr().err
