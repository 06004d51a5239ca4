"""Expert gradients reduced over the expert-data-parallel group whenever it differs from the dense one.

Megatron-Core 0.16.1 marks expert weights ``allreduce = not (is_expert and expert_parallel)``
with ``expert_parallel = EP > 1`` (``tensor_parallel/layers.py`` L886/L1209,
``transformer/moe/experts.py`` L203, ``extensions/transformer_engine.py``). DDP and the
optimizer reduce and shard ``allreduce=True`` parameters over the dense data-parallel group, so
with EP = 1 experts are treated as dense. That is right only while the expert-data-parallel group
equals the dense one, i.e. ETP = TP. With EP = 1 and ETP != TP (e.g. TP=1, ETP=2, or TP=2,
ETP=1) expert gradients are averaged over ranks holding other slices (or never reduced over their
replicas), and the distributed optimizer's first overlapped parameter gather mixes expert slices:
training runs, silently wrong (seen on CPU: TP=1/ETP=2 starts from a different loss).

``patch_expert_gradient_groups`` re-marks every parameter of a ``MoELayer``'s experts after it
is built, with the rule below; layouts where the groups agree keep Megatron's marking, so their
checkpoints (optimizer state included) are unchanged. Checked against 0.16.1; review on upgrade.
"""

from __future__ import annotations

_PATCHED = False


def expert_params_reduce_with_dense() -> bool:
    """Whether expert parameters may share the dense data-parallel reduction (Megatron's ``allreduce``)."""
    from megatron.core import parallel_state

    return (parallel_state.get_expert_model_parallel_world_size() == 1
            and parallel_state.get_expert_tensor_parallel_world_size()
            == parallel_state.get_tensor_model_parallel_world_size())


def patch_expert_gradient_groups() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from megatron.core.transformer.moe.moe_layer import MoELayer

    original_init = MoELayer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        shared = expert_params_reduce_with_dense()
        for parameter in self.experts.parameters():
            parameter.allreduce = shared

    MoELayer.__init__ = init
    _PATCHED = True
