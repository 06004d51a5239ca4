"""vLLM as the rollout engine (make test-vllm, after make setup-vllm): weight sync, equality with the
kit's own generator, and what happens when the engine fails."""

import os

import pytest
import torch

from megatron_patch.errors import InputError
from megatron_patch.models.generation import Sampling, generate
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.rl.vllm_engine import VllmEngine, VllmEngineError, hf_weights, vllm_python
from tests.conftest import TINY_DENSE
from tests.helpers import teacher_forced_log_probs

pytestmark = pytest.mark.vllm

# Untied with std-0.6 weights: peaked distributions, so greedy rows do not hinge on 1e-6 differences.
ARCH = TINY_DENSE.replace(tie_word_embeddings=False, vocab_size=512)
PROMPTS = [[5, 9, 31], [7, 3, 200, 14, 99, 6, 41, 8], list(range(40, 61))]


@pytest.fixture(scope="module")
def model(megatron_world):
    torch.manual_seed(3)
    return build_gpt_model(ARCH, BuildOptions(aux_loss_coeff=0.0), init_method_std=0.6).eval()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = VllmEngine(ARCH, vllm_python(None), max_model_len=128, dtype="float32", max_num_seqs=8,
                        log_path=tmp_path_factory.mktemp("vllm") / "vllm.log")
    yield engine
    engine.close()
    assert engine.process.poll() is not None


def test_after_each_sync_vllm_generates_what_the_kit_generates(model, engine):
    greedy = Sampling(max_new_tokens=16, temperature=0, stop_token_ids=(1,))
    engine.sync(hf_weights([model], ARCH))
    before = engine.generate(PROMPTS, [0, 1, 2], greedy)
    ours = generate(model, PROMPTS, greedy, ARCH.vocab_size)
    assert [c.tokens for c in before] == [c.tokens for c in ours]
    gap = max((torch.tensor(a.log_probs) - torch.tensor(b.log_probs)).abs().max().item() for a, b in zip(before, ours))
    assert gap <= 1e-4, gap
    print(f"greedy after sync: tokens identical, max |delta log-prob| {gap:.2e}")
    # A step's worth of change to the weights: vLLM keeps the old ones until the next sync.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    changed = generate(model, PROMPTS, greedy, ARCH.vocab_size)
    assert [c.tokens for c in changed] != [c.tokens for c in ours]
    assert [c.tokens for c in engine.generate(PROMPTS, [0, 1, 2], greedy)] == [c.tokens for c in before]
    seconds = engine.sync(hf_weights([model], ARCH))
    after = engine.generate(PROMPTS, [0, 1, 2], greedy)
    assert [c.tokens for c in after] == [c.tokens for c in changed]
    assert seconds > 0


def test_sampled_tokens_carry_the_training_forwards_log_probs(model, engine):
    """The rollout's log-probs are of the temperature-scaled distribution (vLLM's processed_logprobs), as the
    training forward computes them: the gap is vLLM's numerics against Megatron-Core's."""
    engine.sync(hf_weights([model], ARCH))
    sampling = Sampling(max_new_tokens=16, temperature=0.8, stop_token_ids=(1,))
    completions = engine.generate(PROMPTS, [11, 12, 13], sampling)
    again = engine.generate(PROMPTS, [11, 12, 13], sampling)
    assert [c.tokens for c in again] == [c.tokens for c in completions]  # seeded per sequence
    forced = teacher_forced_log_probs(model, ARCH.vocab_size, PROMPTS, completions, sampling.scale)
    gap = max((f - torch.tensor(c.log_probs)).abs().max().item() for f, c in zip(forced, completions))
    assert gap <= 1e-4, gap
    print(f"sampled at temperature 0.8: max |delta log-prob| against the training forward {gap:.2e}")


def test_a_tied_model_gets_its_output_layer_synced_too(megatron_world, tmp_path):
    """vLLM processes a tied output layer once, at load (on CPU, packing it for oneDNN): the driver redoes it."""
    arch = ARCH.replace(tie_word_embeddings=True)
    torch.manual_seed(4)
    model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0), init_method_std=0.6).eval()
    engine = VllmEngine(arch, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=4,
                        log_path=tmp_path / "vllm.log")
    try:
        engine.sync(hf_weights([model], arch))
        greedy = Sampling(max_new_tokens=8, temperature=0)
        theirs, ours = engine.generate(PROMPTS, [0, 1, 2], greedy), generate(model, PROMPTS, greedy, arch.vocab_size)
        assert [c.tokens for c in theirs] == [c.tokens for c in ours]
        assert max(abs(a - b) for x, y in zip(theirs, ours) for a, b in zip(x.log_probs, y.log_probs)) <= 1e-4
    finally:
        engine.close()


def test_a_missing_environment_and_a_dead_engine_are_named(tmp_path):
    with pytest.raises(InputError, match="make setup-vllm"):
        vllm_python(str(tmp_path / "nowhere" / "python"))
    engine = VllmEngine(ARCH, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=2,
                        log_path=tmp_path / "vllm.log")
    try:
        engine.process.kill()
        engine.process.wait()
        with pytest.raises(VllmEngineError, match=rf"vLLM engine \(pid {engine.process.pid}\) exited with code -9"):
            engine.generate(PROMPTS, [0, 1, 2], Sampling(max_new_tokens=4, temperature=0))
    finally:
        engine.close()
    assert not os.path.exists(engine.folder)
