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


@pytest.mark.slow
def test_peft_adapter_of_a_moe_with_a_dense_layer_applies_every_adapter(megatron_world, hf_checkpoints, tmp_path,
                                                                          capsys):
    """Stock peft would drop the dense layer's MLP adapters (it maps gate/up/down_proj onto the experts):
    base + adapter must equal the merged model, and --verify must check that every adapter applied."""
    import json

    from megatron_patch.checkpoints import load_weights
    from megatron_patch.convert.__main__ import main as convert_main
    from megatron_patch.lora.__main__ import main as lora_main
    from megatron_patch.lora.apply import is_adapter_key
    from megatron_patch.lora.checkpoints import AdapterSavePolicy
    from megatron_patch.lora.peft_adapter import peft_logits
    from megatron_patch.models.qwen3.hf_model import load_hf_model
    from megatron_patch.training.checkpointing import save_checkpoint

    arch, hf_dir, _ = hf_checkpoints["moe-mqa-mixed-tied"]  # layer 1 is dense (mlp_only_layers)
    assert not arch.layer_is_moe(1) and arch.layer_is_moe(0)
    base = tmp_path / "base"
    assert convert_main(["--load-dir", str(hf_dir), "--save-dir", str(base), "--precision", "fp32"]) == 0
    model = build_gpt_model(arch, BuildOptions(precision="fp32", aux_loss_coeff=0.0))
    settings = LoraSettings(rank=4, alpha=8, targets=("all",))
    apply_lora([model], settings)
    load_weights(base, [model], keep=lambda key: not is_adapter_key(key))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained adapters: B away from its zero start
        for _, parameter in adapter_parameters([model]):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    policy = AdapterSavePolicy.for_run(settings, adapters_only=True, load=str(base))
    save_checkpoint(tmp_path / "run", 1, [model], None, None, 0, save_optim=False, extra={"lora": policy.record()},
                    keep=policy.keep())
    merged, peft_dir = tmp_path / "merged", tmp_path / "peft"
    status = lora_main(["--adapter", str(tmp_path / "run"), "--merged-out", str(merged), "--peft-out", str(peft_dir),
                        "--hf-dir", str(hf_dir), "--precision", "fp32", "--verify"])
    printed = capsys.readouterr()
    assert status == 0 and "verify PEFT: fp32" in printed.out, printed.err
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.1.mlp.{p}_proj.weight" for p in ("down", "gate", "up")]
    tokens = torch.randint(0, arch.vocab_size, (1, 12), generator=generator)
    with torch.no_grad():
        expected = load_hf_model(merged, torch.float32)(input_ids=tokens).logits
        base_only = load_hf_model(hf_dir, torch.float32)(input_ids=tokens).logits
    logits, unapplied = peft_logits(hf_dir, peft_dir, tokens)
    assert unapplied == []
    assert (logits - expected).abs().max().item() <= 1e-4
    assert (base_only - expected).abs().max().item() > 1e-2  # the adapters do change the model

    # The adapter as the old export wrote it (no target_parameters): --verify must refuse it.
    del config["target_parameters"]
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    _, unapplied = peft_logits(hf_dir, peft_dir, tokens)
    assert unapplied == [f"model.layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]
