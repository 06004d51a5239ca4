"""Our Megatron-Core Qwen3 models, loaded from HF checkpoints through the mapping, reproduce transformers' logits."""

import pytest
import torch

from megatron_patch.models.logits import forward_logits
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.qwen3.loading import load_hf_weights
from megatron_patch.models.qwen3.parity import compare_with_transformers
from megatron_patch.models.weight_mapping import MappingError
from tests.conftest import PARITY_CONFIGS

FP32_TOLERANCE = 1e-4


def sample_tokens(vocab_size, batch=2, seq=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers(name, megatron_world, hf_checkpoints):
    arch, path, hf_model = hf_checkpoints[name]
    model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0))
    load_hf_weights(model, path)
    tokens = sample_tokens(arch.vocab_size)
    ours = forward_logits(model, tokens, vocab_size=arch.vocab_size)
    with torch.no_grad():
        reference = hf_model(input_ids=tokens).logits
    assert ours.shape == reference.shape
    delta = (ours - reference).abs().max().item()
    assert delta <= FP32_TOLERANCE, f"{name}: max |dlogits| = {delta:.3g}"
    # A wrong mapping gives O(1) differences; make sure the check could fail.
    assert (ours - hf_model(input_ids=sample_tokens(arch.vocab_size, seed=1)).logits).abs().max() > 1e-2


def test_load_rejects_a_checkpoint_of_another_shape(megatron_world, hf_checkpoints, tmp_path):
    arch, path, _ = hf_checkpoints["moe-gqa"]
    model = build_gpt_model(arch.replace(moe_ffn_hidden_size=40))
    # Named by the file and the HF tensor, before anything is read.
    with pytest.raises(MappingError, match=r"model.safetensors: tensor model.layers.0.mlp.experts.0.gate_proj.weight "
                                           r"has shape \(48, 64\), the model needs \(40, 64\)"):
        load_hf_weights(model, path, arch)
    with pytest.raises(MappingError, match=r"missing tensor model.layers.0.mlp.down_proj.weight \(and 2 more\)"):
        load_hf_weights(build_gpt_model(arch), path, arch.replace(dense_layers=(0,)))


@pytest.mark.parametrize("name", ["moe-gqa", "dense-tied"])
def test_bf16_error_is_no_worse_than_transformers_bf16(name, megatron_world, hf_checkpoints):
    arch, path, _ = hf_checkpoints[name]
    result = compare_with_transformers(arch, path, sample_tokens(arch.vocab_size, seq=64), precision="bf16")
    assert result.reference_max_abs_diff > 0  # bf16 really was used on both sides
    assert result.passed, str(result)
