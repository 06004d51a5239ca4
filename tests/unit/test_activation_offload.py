"""AC=offload without Transformer-Engine: the offloaded layers' saved activations go through PyTorch's
save_on_cpu hooks, and the gradients are those of AC=none exactly."""

import torch

from megatron_patch.models.activation_offload import offload_activations
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from tests.conftest import TINY_MOE


def _forward_backward(model, tokens):
    """(loss, gradients, tensors the forward saved for backward outside any inner hooks)."""
    counted = []
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: counted.append(t.numel()) or t, lambda t: t):
        logits = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], attention_mask=None)
    loss = logits.float().square().mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None], sum(counted)


def test_offloaded_layers_save_through_save_on_cpu_and_train_identically(megatron_world):
    torch.manual_seed(0)
    model = build_gpt_model(TINY_MOE, BuildOptions(aux_loss_coeff=0.0))
    tokens = torch.randint(0, TINY_MOE.vocab_size, (1, 16))
    loss, grads, kept = _forward_backward(model, tokens)
    assert offload_activations([model], 2) == [1, 2]
    loss_offloaded, grads_offloaded, kept_offloaded = _forward_backward(model, tokens)
    assert loss_offloaded == loss and all(torch.equal(a, b) for a, b in zip(grads, grads_offloaded))
    # What the two layers saved went to save_on_cpu's hooks, not the outer ones: on a GPU, to the host.
    assert 0 < kept_offloaded < kept
