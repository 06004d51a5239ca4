"""Routing replay (R3): the experts a forward used, read off, and replayed through Megatron-Core's RouterReplay."""

import pytest
import torch

from megatron_patch.models.generation import Sampling, generate
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.routing import RoutingRecorder, RoutingReplay, differing_routes
from tests.conftest import TINY_MOE

ARCH = TINY_MOE.replace(dense_layers=(1,))  # a dense layer among the MoE ones: routes cover MoE layers only


@pytest.fixture(scope="module")
def model(megatron_world):
    torch.manual_seed(11)
    return build_gpt_model(ARCH, BuildOptions(aux_loss_coeff=0.0)).eval()


def tokens_of(rows, length, seed=0):
    return torch.randint(2, ARCH.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def forward(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(input_ids=tokens, position_ids=positions, attention_mask=None)


def test_replaying_the_recorded_routes_gives_the_same_logits_and_other_routes_change_them(model):
    tokens = tokens_of(3, 16)
    recorder = RoutingRecorder(model)
    replay = RoutingReplay(model)
    try:
        with torch.no_grad():
            plain = forward(model, tokens)
        routes = recorder.routes(16, 3)
        assert routes.shape == (3, 16, 3, ARCH.moe_topk)  # 4 layers, one dense
        assert (routes[..., 1:] > routes[..., :-1]).all()  # distinct experts, ascending
        replay.replay(routes)
        with torch.no_grad():
            replayed = forward(model, tokens)
        assert torch.equal(recorder.routes(16, 3), routes)
        assert torch.equal(replayed, plain)
        # Other experts for every token: the forward follows them, and the logits move.
        other = ((routes.long() + 1) % ARCH.num_experts).sort(dim=-1).values
        replay.replay(other)
        logits = forward(model, tokens)
        used = recorder.routes(16, 3)
        assert torch.equal(used.long(), other)
        assert (logits - plain).abs().max() > 1e-3
        # The router still trains under replay: its scores weigh the replayed experts.
        logits.float().square().mean().backward()
        router = replay.routers[0]
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        replay.release()
        with torch.no_grad():
            assert torch.equal(forward(model, tokens), plain)
    finally:
        replay.release()
        recorder.remove()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("slots", [0, 2])  # 2: the third prompt is admitted when a slot frees
def test_generation_records_the_routes_a_teacher_forced_forward_takes(model, slots):
    prompts = [tokens_of(1, n, seed=n)[0].tolist() for n in (3, 9, 14)]
    completions = generate(model, prompts, Sampling(max_new_tokens=12, temperature=0.9), ARCH.vocab_size,
                           torch.Generator().manual_seed(5), record_routing=True, slots=slots)
    recorder = RoutingRecorder(model)
    try:
        for prompt, completion in zip(prompts, completions):
            inputs = torch.tensor([prompt + completion.tokens[:-1]])
            assert completion.routing.shape == (inputs.shape[1], 3, ARCH.moe_topk)
            with torch.no_grad():
                forward(model, inputs)
            used = recorder.routes(inputs.shape[1], 1)[0]
            differ, compared = differing_routes(used, completion.routing, torch.ones(inputs.shape[1], dtype=torch.bool))
            assert compared == inputs.shape[1] * 3 and differ == 0
    finally:
        recorder.remove()
    # Perturbed routes are found: every token-layer of the first sequence differs.
    routes = completions[0].routing
    perturbed = ((routes.long() + 1) % ARCH.num_experts).sort(dim=-1).values
    live = torch.ones(routes.shape[0], dtype=torch.bool)
    assert differing_routes(perturbed, routes, live) == (routes.shape[0] * 3, routes.shape[0] * 3)
