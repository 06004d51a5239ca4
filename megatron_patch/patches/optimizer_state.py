"""Make the distributed optimizer on torch's Adam resume exactly from a checkpoint.

Without Apex or Transformer-Engine, Megatron-Core builds the distributed optimizer on
``torch.optim.Adam``/``AdamW``, whose per-parameter state (``step``, ``exp_avg``,
``exp_avg_sq``) exists only after a first ``step()``. ``DistributedOptimizer.sharded_state_dict
(is_loading=True)`` calls ``state_dict()``, which asserts that every state holds one common
``step`` (megatron-core 0.16.1, ``optimizer/distrib_optimizer.py`` ``state_dict``, L640-L643), so
resuming from a checkpoint in a fresh process fails with a bare ``AssertionError``. The
``init_state_fn`` Megatron-Core passes creates the moments but no ``step``.

Then ``load_state_dict`` (L817-L823) gives every parameter's state the *same* ``step`` tensor
(torch's Adam increments each state's step in place, so a shared counter moves once per
parameter), and the per-parameter state it then copies in from ``param_state`` carries the
template's ``step``, not the saved one. Either way the bias correction after a resume is
wrong and the resumed losses drift from the uninterrupted run's from the second step on.

The patch fills empty torch-Adam states with zero moments and ``step`` 0 (what the first
``step()`` would create) before ``sharded_state_dict(is_loading=True)`` runs (the checkpoint
then overwrites the moments), and after ``load_state_dict`` gives each state its own ``step``
tensor holding the saved step (the one Megatron-Core keeps in the param groups). Applied
everywhere (the GPU machine has neither Apex nor Transformer-Engine either).
Checked on megatron-core 0.16.1.
"""

from __future__ import annotations

import functools

import torch

_PATCHED = False


def _fill_empty_adam_state(torch_optimizer) -> None:
    if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            state = torch_optimizer.state[param]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state.setdefault("exp_avg", torch.zeros_like(param, memory_format=torch.preserve_format))
                state.setdefault("exp_avg_sq", torch.zeros_like(param, memory_format=torch.preserve_format))


def _set_steps(torch_optimizer, step: float) -> None:
    if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for state in torch_optimizer.state.values():
        if "step" in state:
            state["step"] = torch.tensor(step, dtype=torch.float32)


def patch_distributed_optimizer_loading() -> bool:
    """Wrap ``DistributedOptimizer.sharded_state_dict``; idempotent."""
    global _PATCHED
    if _PATCHED:
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, *args, **kwargs):
        if is_loading:
            _fill_empty_adam_state(self.optimizer)
        return original(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    original_load = DistributedOptimizer.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        steps = {group.get("step") for group in state_dict["optimizer"]["param_groups"]} - {None}
        if len(steps) == 1:
            _set_steps(self.optimizer, float(steps.pop()))

    DistributedOptimizer.sharded_state_dict = sharded_state_dict
    DistributedOptimizer.load_state_dict = load_state_dict
    _PATCHED = True
    return True
