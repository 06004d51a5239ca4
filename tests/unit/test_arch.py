import json

import pytest
import transformers

from megatron_patch.models.qwen3.arch import ConfigError, Qwen3Arch
from megatron_patch.models.qwen3.hf_model import hf_config
from megatron_patch.models.qwen3.presets import PRESETS, get_preset
from tests.conftest import PARITY_CONFIGS, TINY_MOE

A3B_CONFIG_4X = {
    # Qwen3-30B-A3B config.json as published (transformers 4.51 spelling).
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "rope_theta": 1000000.0, "rope_scaling": None, "vocab_size": 151936,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-06, "max_position_embeddings": 40960,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "attention_bias": False,
    "hidden_act": "silu", "max_window_layers": 48, "use_sliding_window": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "torch_dtype": "bfloat16", "initializer_range": 0.02,
}


def test_a3b_published_config_equals_preset():
    assert Qwen3Arch.from_hf_config(A3B_CONFIG_4X) == get_preset("A3B")


def test_transformers_5_spelling_is_read():
    config = dict(A3B_CONFIG_4X)
    config["num_local_experts"] = config.pop("num_experts")
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    assert Qwen3Arch.from_hf_config(config) == get_preset("A3B")


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_config_written_by_transformers_reads_back(name, tmp_path):
    arch = PARITY_CONFIGS[name]
    hf_config(arch).save_pretrained(tmp_path)  # whatever spelling the installed transformers writes
    written = json.loads((tmp_path / "config.json").read_text())
    assert Qwen3Arch.from_hf_dir(tmp_path) == arch, written
    if transformers.__version__.startswith("5."):
        # The 5.x spelling really is what we just parsed.
        assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == arch.rope_theta
        if arch.is_moe:
            assert written["num_local_experts"] == arch.num_experts and "num_experts" not in written


@pytest.mark.parametrize("name", list(PRESETS))
def test_to_hf_config_round_trips(name):
    arch = PRESETS[name]
    assert Qwen3Arch.from_hf_config(arch.to_hf_config()) == arch


def test_published_parameter_counts():
    # Qwen3-30B-A3B: 30,532,122,624 total (61,064,245,248 bytes in bf16), 3,353,032,704 active per token.
    counts = get_preset("A3B").parameter_counts()
    assert counts["total"] == 30_532_122_624
    assert counts["active"] == 3_353_032_704
    assert 235e9 < get_preset("A22B").parameter_counts()["total"] < 236e9
    assert 8.1e9 < get_preset("8B").parameter_counts()["total"] < 8.3e9


def test_parameter_counts_match_transformers():
    for arch in PARITY_CONFIGS.values():
        from megatron_patch.models.qwen3.hf_model import random_hf_model

        model = random_hf_model(arch)
        assert arch.parameter_counts()["total"] == sum(p.numel() for p in model.parameters())


def test_moe_layer_pattern_follows_hf_rule():
    arch = TINY_MOE.replace(num_layers=6, decoder_sparse_step=2, dense_layers=(3,))
    assert arch.moe_layer_pattern == (False, True, False, False, False, True)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unsupported architecture"),
        ({"num_hidden_layers": None}, "missing field num_hidden_layers"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok=0"),
        ({"num_key_value_heads": 5}, "not a multiple"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_bad_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        Qwen3Arch.from_hf_config({**A3B_CONFIG_4X, **change}, source="x/config.json")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        Qwen3Arch.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 1,\n oops}')
    with pytest.raises(ConfigError, match="invalid JSON at line 2"):
        Qwen3Arch.from_hf_dir(tmp_path)
