"""Megatron's DDP + distributed optimizer + get_forward_backward_func lower the loss on a fixed batch (1 process)."""

import torch

from megatron_patch.models.qwen3.builder import build_gpt_model
from tests.conftest import TINY_MOE
from tests.helpers import train_on_fixed_batch


def test_a_few_steps_lower_the_loss(megatron_world):
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import DistributedOptimizer

    model = build_gpt_model(TINY_MOE)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, TINY_MOE.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    losses, optimizer = train_on_fixed_batch(model, tokens, steps=6, lr=3e-3)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.5
    # The real Megatron machinery was used, and every parameter (experts and router included) moved.
    assert isinstance(model.config.no_sync_func.__self__, DistributedDataParallel)
    assert model.config.grad_scale_func.__self__ is optimizer
    assert optimizer.chained_optimizers
    assert all(isinstance(o, DistributedOptimizer) for o in optimizer.chained_optimizers)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
