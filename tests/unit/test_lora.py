"""LoRA settings, adapter placement and parameter counts on a tiny MoE (one process)."""

import pytest
import torch

from megatron_patch.lora.apply import adapter_parameters, apply_lora, trainable_parameter_count
from megatron_patch.lora.config import LoraConfigError, LoraSettings, parse_targets
from megatron_patch.models.logits import forward_logits
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.qwen3.loading import load_hf_weights
from tests.conftest import PARITY_CONFIGS


def test_hf_names_select_the_fused_megatron_linears():
    assert parse_targets(["q_proj", "o_proj"]) == ("linear_qkv", "linear_proj")
    assert parse_targets(["down_proj", "gate_proj", "up_proj"]) == ("linear_fc1", "linear_fc2")
    assert parse_targets(["all"]) == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    with pytest.raises(LoraConfigError, match="unknown module 'qkv'"):
        parse_targets(["qkv"])
    with pytest.raises(LoraConfigError, match="--lora-rank must be >= 1"):
        LoraSettings(rank=0)
    assert LoraSettings(rank=8, alpha=16).scale == 2.0


@pytest.mark.parametrize("impl", ["torch", "local"])
@pytest.mark.parametrize("name, targets", [("moe-mqa-mixed-tied", ("all",)), ("moe-gqa", ("q_proj", "down_proj"))])
def test_adapters_are_the_only_trainable_parameters_and_start_as_a_no_op(
        megatron_world, hf_checkpoints, impl, name, targets):
    arch, path, _ = hf_checkpoints[name]
    model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0, transformer_impl=impl))
    load_hf_weights(model, path)
    tokens = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    before = forward_logits(model, tokens, vocab_size=arch.vocab_size)
    settings = LoraSettings(rank=4, alpha=8, targets=targets)
    apply_lora([model], settings)
    trainable = adapter_parameters([model])
    assert trainable and all(".adapter." in n or "_adapter." in n for n, _ in trainable)
    assert sum(p.numel() for _, p in trainable) == trainable_parameter_count(arch, settings)
    assert torch.equal(forward_logits(model, tokens, vocab_size=arch.vocab_size), before)  # B = 0
    # A nonzero B changes the output: the adapters are on the forward path.
    with torch.no_grad():
        for _, parameter in trainable:
            parameter.add_(0.01)
    assert (forward_logits(model, tokens, vocab_size=arch.vocab_size) - before).abs().max() > 1e-3


def test_adapters_start_the_same_under_both_expert_implementations(megatron_world, hf_checkpoints):
    arch = PARITY_CONFIGS["moe-gqa"]
    settings = LoraSettings(rank=4)
    models = {}
    for impl in ("torch", "local"):
        models[impl] = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0, transformer_impl=impl))
        apply_lora([models[impl]], settings)
    local_a = models["local"].decoder.layers[0].mlp.experts.local_experts[3].linear_fc1.adapter.linear_in.weight
    grouped_a = models["torch"].decoder.layers[0].mlp.experts.fc1_adapter.linear_in.weight[3]
    assert torch.equal(local_a, grouped_a)
