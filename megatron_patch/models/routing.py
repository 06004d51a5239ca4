"""Which experts each token went to, read off a forward and replayed in a later one (routing replay, R3).

A rollout engine and the training forward choose experts independently: near-ties in the router's
scores fall differently under other kernels, batch shapes or precision, so the same token can take
other experts in training than it took when it was sampled. Routing replay makes the training
forwards use the rollout's experts, while the router's scores are still computed (the chosen
experts' weights come from them) and trained.

Reading: a forward hook on each MoE router (Megatron-Core's ``TopKRouter``) keeps its routing map
``[tokens, experts]``; tokens are in Megatron's ``[sequence, batch]`` order, flattened. Replaying:
Megatron-Core's own ``RouterReplay`` (0.16.1: ``transformer/moe/router_replay.py``), one per router,
in ``REPLAY_FORWARD``, so activation recompute in the backward pass replays the same experts.

Routes are int16 tensors ``[..., layers, top-k]`` of expert ids in ascending order, one row per
token, over the model's MoE layers in order. Tensor parallelism splits a router's tokens over
ranks (sequence parallelism), which this does not follow: recording and replay need TP = 1
(expert parallelism is fine: a router sees its rank's own tokens).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

ROUTE_DTYPE = torch.int16


def moe_routers(model) -> list:
    """The MoE routers of ``model`` (a GPTModel, or a wrapper around one), in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [module for module in model.modules() if isinstance(module, TopKRouter)]


def experts_of(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """``[tokens, top-k]`` expert ids (ascending) from a boolean routing map ``[tokens, experts]``.

    Every token takes exactly top-k experts (no capacity dropping in these runs). topk, not nonzero:
    it runs every forward of every MoE layer, and nonzero would wait for the device each time.
    """
    chosen = routing_map.to(torch.int8).topk(topk, dim=-1).indices
    return chosen.sort(dim=-1).values.to(ROUTE_DTYPE)


class RoutingRecorder:
    """Keeps the experts every MoE router of ``model`` used in its latest forward."""

    def __init__(self, model):
        self.routers = moe_routers(model)
        self.latest: list[torch.Tensor | None] = [None] * len(self.routers)
        self._hooks = [router.register_forward_hook(self._hook(index)) for index, router in enumerate(self.routers)]

    def _hook(self, index: int):
        def keep(router, inputs, outputs):
            self.latest[index] = experts_of(outputs[1].detach(), router.topk)
        return keep

    @property
    def layers(self) -> int:
        return len(self.routers)

    def routes(self, sequence: int, batch: int) -> torch.Tensor:
        """The latest forward's experts as ``[batch, sequence, layers, top-k]``."""
        if any(latest is None for latest in self.latest):
            raise RuntimeError("no forward has run through every MoE router since the recorder was attached")
        stacked = torch.stack([latest.view(sequence, batch, -1) for latest in self.latest], dim=2)
        return stacked.transpose(0, 1)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class RoutingReplay:
    """Megatron-Core's ``RouterReplay`` on every MoE router of ``model``: ``replay(routes)`` makes the
    next forwards (and their recompute) use ``routes`` until ``release()``."""

    def __init__(self, model):
        from megatron.core.transformer.moe.router_replay import RouterReplay

        self.routers = moe_routers(model)
        for router in self.routers:
            if router.router_replay is None:
                router.router_replay = RouterReplay()
                # Its constructor registers it in a process-wide list (for the whole-model setters), which
                # would keep every model built in this process alive; this class addresses its own.
                RouterReplay.global_router_replay_instances.remove(router.router_replay)

    def replay(self, routes: torch.Tensor) -> None:
        """``routes`` ``[batch, sequence, layers, top-k]``: the experts of each input token in each layer."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if routes.shape[2] != len(self.routers):
            raise ValueError(f"routes for {routes.shape[2]} MoE layers, the model has {len(self.routers)}")
        tokens_first = routes.transpose(0, 1).long()  # Megatron's [sequence, batch] token order
        for layer, router in enumerate(self.routers):
            replay = router.router_replay
            replay.clear_indices()
            replay.set_target_indices(tokens_first[:, :, layer].reshape(-1, routes.shape[-1]))
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def release(self) -> None:
        for router in self.routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()


@contextmanager
def recording(model):
    """A ``RoutingRecorder`` on ``model`` for the block, its hooks removed after."""
    recorder = RoutingRecorder(model)
    try:
        yield recorder
    finally:
        recorder.remove()


def differing_routes(used: torch.Tensor, expected: torch.Tensor, live: torch.Tensor) -> tuple[int, int]:
    """(token-layer top-k sets that differ, token-layers compared) at the ``live`` tokens.

    ``used``, ``expected``: ``[..., layers, top-k]`` ascending expert ids; ``live``: ``[...]`` bool.
    """
    differ = (used != expected).any(dim=-1)  # [..., layers]
    differ = differ[live]
    return int(differ.sum()), differ.numel()
