"""The generator's oneDNN linears: same maths as the parallel linears' own forward, used only where
nothing else is asked of them, and gone when the context ends."""

import torch
from torch.profiler import profile

from megatron_patch.models.onednn_linear import onednn_linears
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from tests.conftest import TINY_DENSE


def _forward(model, tokens):
    return model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)


def _onednn_calls(function) -> int:
    with profile() as trace:
        function()
    return sum(event.count for event in trace.key_averages() if event.key == "mkldnn::_linear_pointwise")


def test_onednn_linears_give_the_models_own_logits_and_go_away(megatron_world):
    torch.manual_seed(3)
    arch = TINY_DENSE  # tied: the output layer is handed the embedding's weight
    model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0)).eval()
    tokens = torch.randint(0, arch.vocab_size, (3, 11))
    with torch.no_grad():
        expected = _forward(model, tokens)
        with onednn_linears(model):
            routed = _forward(model, tokens)
            calls = _onednn_calls(lambda: _forward(model, tokens))
            with onednn_linears(model):  # nested: the outer context stays in charge
                assert _onednn_calls(lambda: _forward(model, tokens)) == calls
        after = _onednn_calls(lambda: _forward(model, tokens))
    linears_per_layer = 4  # qkv, proj, fc1, fc2
    assert calls == arch.num_layers * linears_per_layer + 1  # + the output layer
    assert after == 0
    assert torch.allclose(routed, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_with_gradients_the_linears_keep_their_own_forward(megatron_world):
    torch.manual_seed(3)
    model = build_gpt_model(TINY_DENSE, BuildOptions(aux_loss_coeff=0.0))
    tokens = torch.randint(0, TINY_DENSE.vocab_size, (2, 7))
    with onednn_linears(model):
        calls = _onednn_calls(lambda: _forward(model, tokens).sum().backward())
    assert calls == 0
    assert model.decoder.layers[0].mlp.linear_fc1.weight.grad is not None
