"""The kit's generator (Megatron-Core's static KV cache) and the chunked log-probs RL trains on."""

import pytest
import torch

from megatron_patch.models.generation import (
    Sampling,
    generate,
    sampling_generator,
)
from megatron_patch.models.log_probs import token_entropy, token_log_probs
from megatron_patch.models.logits import forward_logits
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from tests.conftest import TINY_DENSE, TINY_MOE
from tests.helpers import rollout_log_prob_gap

# Different lengths, so rows join generation at different steps.
PROMPT_LENGTHS = (3, 8, 13, 21)
# Untied: a random tied model only repeats its last input token, which any cache bug would also give.
ARCHS = {"moe": TINY_MOE, "dense": TINY_DENSE.replace(tie_word_embeddings=False)}


def prompts_of(lengths, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def models(megatron_world):
    torch.manual_seed(7)
    return {name: build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0)).eval() for name, arch in ARCHS.items()}


def uncached_greedy(model, prompts, steps, vocab_size):
    """Greedy continuations by whole-sequence forward passes, no cache: the rows right-padded (causal
    attention cannot see padding after a token), each extended by the argmax after its last token."""
    rows = [list(prompt) for prompt in prompts]
    for _ in range(steps):
        tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for index, row in enumerate(rows):
            tokens[index, :len(row)] = torch.tensor(row)
        logits = forward_logits(model, tokens, vocab_size)
        for index, row in enumerate(rows):
            row.append(int(logits[index, len(row) - 1].argmax()))
    return [row[len(prompt):] for row, prompt in zip(rows, prompts)]


@pytest.mark.parametrize("name", ["moe", "dense"])
def test_kv_cached_greedy_equals_uncached_greedy(models, name):
    model, arch = models[name], ARCHS[name]
    prompts = prompts_of(PROMPT_LENGTHS, arch.vocab_size)
    completions = generate(model, prompts, Sampling(max_new_tokens=48, temperature=0), arch.vocab_size)
    expected = uncached_greedy(model, prompts, 48, arch.vocab_size)
    for completion, reference in zip(completions, expected):
        assert len(completion.tokens) == 48 and completion.truncated
        assert completion.tokens == reference
        assert len(set(completion.tokens)) >= 8  # text that depends on the context, not one repeated token


@pytest.mark.parametrize("name", ["moe", "dense"])
def test_sampled_log_probs_equal_the_teacher_forced_ones(models, name):
    model, arch = models[name], ARCHS[name]
    sampling = Sampling(max_new_tokens=24, temperature=0.8, top_p=0.95, top_k=100)
    completions, gap = rollout_log_prob_gap(model, arch.vocab_size, prompts_of(PROMPT_LENGTHS, arch.vocab_size),
                                            sampling, seed=3)
    assert gap <= 1e-5, gap
    assert sum(len(c.tokens) for c in completions) >= 4 * 24 - 8  # stopped rows aside, every token was checked


def test_sampling_is_seeded_and_stops_at_a_stop_token(models):
    model, vocab = models["moe"], TINY_MOE.vocab_size
    prompts = prompts_of(PROMPT_LENGTHS, vocab)
    sampling = Sampling(max_new_tokens=16, temperature=1.0)
    first = generate(model, prompts, sampling, vocab, sampling_generator(11))
    again = generate(model, prompts, sampling, vocab, sampling_generator(11))
    other = generate(model, prompts, sampling, vocab, sampling_generator(12))
    assert [c.tokens for c in first] == [c.tokens for c in again]
    assert [c.tokens for c in first] != [c.tokens for c in other]
    # The third token sampled for row 0 becomes a stop token: row 0 ends there, the others run on.
    stop = first[0].tokens[2]
    stopping = Sampling(max_new_tokens=16, temperature=1.0, stop_token_ids=(stop,))
    stopped = generate(model, prompts, stopping, vocab, sampling_generator(11))
    end = first[0].tokens.index(stop) + 1
    assert stopped[0].tokens == first[0].tokens[:end] and stopped[0].stopped
    for row in range(1, len(prompts)):
        tokens = stopped[row].tokens
        assert tokens[-1] == stop if stopped[row].stopped else len(tokens) == 16


def test_a_generator_per_row_gives_each_row_the_same_samples_in_any_batch(models):
    """GRPO seeds each sample by its place in the global batch: its tokens must not depend on the
    other rows (or on how the batch is split over data-parallel ranks or rollout batches)."""
    model, vocab = models["moe"], TINY_MOE.vocab_size
    prompts = prompts_of(PROMPT_LENGTHS, vocab)
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9)
    together = generate(model, prompts, sampling, vocab, [sampling_generator(100 + i) for i in range(4)])
    for row in (1, 3):
        alone = generate(model, [prompts[row]], sampling, vocab, [sampling_generator(100 + row)])
        assert alone[0].tokens == together[row].tokens
        assert alone[0].log_probs == pytest.approx(together[row].log_probs, abs=1e-5)
    # GRPO's --rollout-batch: the same rows, three at a time.
    batched = generate(model, prompts, sampling, vocab, [sampling_generator(100 + i) for i in range(4)], slots=3)
    assert [c.tokens for c in batched] == [c.tokens for c in together]


def test_a_prompt_admitted_several_times_is_computed_once(models):
    """GRPO's samples of one prompt: the prompt goes through the forward once, and every sample is what it
    would be alone (its own generator), its recorded experts included."""
    model, vocab = models["moe"], TINY_MOE.vocab_size
    a, b = prompts_of((5, 11), vocab)
    prompts = [a, b, a, a, b]
    sampling = Sampling(max_new_tokens=10, temperature=1.0)
    fed = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        together = generate(model, prompts, sampling, vocab, [sampling_generator(200 + i) for i in range(5)],
                            record_routing=True)
    finally:
        hook.remove()
    assert fed[0] == len(a) + len(b)  # the first forward: each distinct prompt once
    assert len({tuple(c.tokens) for c in together}) >= 4  # the samples of a prompt still differ
    for index, prompt in enumerate(prompts):
        (alone,) = generate(model, [prompt], sampling, vocab, [sampling_generator(200 + index)], record_routing=True)
        assert alone.tokens == together[index].tokens
        assert alone.log_probs == pytest.approx(together[index].log_probs, abs=1e-5)
        assert torch.equal(alone.routing, together[index].routing)


VARIED_PROMPTS = (3, 30, 8, 13, 5, 21, 9, 17, 2)


def varied_length_sampling(model, prompts, vocab_size, budget=20):
    """Greedy with stop tokens that end rows at different steps: the tokens a first run made at
    steps 2, 7, 12 and 16 of four rows."""
    first = generate(model, prompts, Sampling(max_new_tokens=budget, temperature=0), vocab_size)
    stops = tuple(dict.fromkeys(c.tokens[step] for c, step in zip(first, (2, 7, 12, 16))))
    return Sampling(max_new_tokens=budget, temperature=0, stop_token_ids=stops)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_continuous_batching_gives_each_sequence_its_one_batch_tokens(models, slots):
    """Fewer slots than prompts: finished rows leave and the next prompts are prefilled into their
    slots mid-run. One slot: the cache empties between sequences. Two: the run outlasts the cache's
    75 positions, so the live keys are shifted back to its front once (at position 75, by 46)."""
    model, vocab = models["dense"], ARCHS["dense"].vocab_size
    prompts = prompts_of(VARIED_PROMPTS, vocab)
    sampling = varied_length_sampling(model, prompts, vocab)
    together = generate(model, prompts, sampling, vocab)
    lengths = [len(c.tokens) for c in together]
    assert min(lengths) <= 8 and max(lengths) == 20 and sum(c.stopped for c in together) >= 4, lengths
    rolled = generate(model, prompts, sampling, vocab, slots=slots)
    assert [c.tokens for c in rolled] == [c.tokens for c in together]
    assert [c.stopped for c in rolled] == [c.stopped for c in together]
    for a, b in zip(rolled, together):
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-5)


def test_each_sequence_is_handed_on_as_it_ends_not_after_the_batch(models):
    """on_finish (GRPO scores a response while the others generate): each sequence once, with its final tokens,
    at the step it ends: the short ones before the longest has its last token."""
    model, vocab = models["dense"], ARCHS["dense"].vocab_size
    prompts = prompts_of(VARIED_PROMPTS, vocab)
    sampling = varied_length_sampling(model, prompts, vocab)
    told, forwards = [], []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        completions = generate(model, prompts, sampling, vocab, slots=2,
                               on_finish=lambda index, tokens, stopped: told.append(
                                   (index, list(tokens), stopped, len(forwards))))
    finally:
        hook.remove()
    assert sorted(index for index, *_ in told) == list(range(len(prompts)))
    for index, tokens, stopped, _ in told:
        assert tokens == completions[index].tokens and stopped == completions[index].stopped
    assert told[0][3] < len(forwards) and [when for *_, when in told] == sorted(when for *_, when in told)


def test_each_step_is_one_forward_of_the_live_rows_tokens_only(models):
    """Decode tokens and newly admitted prompts share one forward, packed: no padding, no finished row."""
    model, vocab = models["dense"], ARCHS["dense"].vocab_size
    prompts = prompts_of(VARIED_PROMPTS, vocab)
    sampling = varied_length_sampling(model, prompts, vocab)
    fed, rows = [], []
    hooks = [model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape),
                                             with_kwargs=True),
             model.output_layer.register_forward_hook(lambda module, args, output: rows.append(output[0].shape[0]))]
    try:
        completions = generate(model, prompts, sampling, vocab, slots=4)
    finally:
        for hook in hooks:
            hook.remove()
    assert all(batch == 1 for batch, _ in fed)  # [1, tokens]: rows packed one after another
    # Each prompt once, and each sequence every token it made but its last; a row that ended feeds nothing.
    assert sum(width for _, width in fed) == sum(map(len, prompts)) + sum(len(c.tokens) - 1 for c in completions)
    assert len({len(c.tokens) for c in completions}) >= 4  # lengths vary, so rows leave at different steps
    # The output layer sees each row's last token only: one per token generated, at most 4 rows at once.
    assert sum(rows) == sum(len(c.tokens) for c in completions) and max(rows) == 4
    assert len(fed) == len(rows) < len(prompts) + max(len(c.tokens) for c in completions) * 2


def test_top_k_one_is_greedy(models):
    model, vocab = models["dense"], ARCHS["dense"].vocab_size
    prompts = prompts_of(PROMPT_LENGTHS, vocab)
    greedy = generate(model, prompts, Sampling(max_new_tokens=8, temperature=0), vocab)
    top1 = generate(model, prompts, Sampling(max_new_tokens=8, temperature=1.3, top_k=1), vocab, sampling_generator(0))
    assert [c.tokens for c in greedy] == [c.tokens for c in top1]


@pytest.mark.parametrize("bad, message", [
    ({"max_new_tokens": 0}, "max_new_tokens 0"), ({"temperature": -1}, "temperature -1"),
    ({"top_p": 0}, "top_p 0"), ({"top_k": -2}, "top_k -2"),
])
def test_bad_sampling_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**bad)


def test_chunked_log_probs_and_entropy_equal_the_whole_vocabulary_ones(megatron_world):
    generator = torch.Generator().manual_seed(0)
    padded, vocab = 64, 50  # columns 50..63 are vocabulary padding
    logits = torch.randn(3, 7, padded, generator=generator, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, vocab, (3, 7), generator=generator)
    reference_logits = logits.detach().clone().requires_grad_()
    reference = torch.log_softmax(reference_logits[..., :vocab] / 0.7, dim=-1)
    expected = reference.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = token_log_probs(logits, targets, temperature=0.7, vocab_size=vocab, chunk_tokens=4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    weights = torch.randn(3, 7, generator=generator)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=0, atol=1e-6)
    assert logits.grad[..., vocab:].abs().max() == 0  # padding gets no gradient
    entropy = -(reference.exp() * reference).sum(-1)
    torch.testing.assert_close(token_entropy(logits, 0.7, vocab, chunk_tokens=5), entropy.detach(), rtol=0, atol=1e-5)
    # bf16 logits stay bf16; each chunk is upcast on its own.
    halves = logits.detach().bfloat16()
    assert token_log_probs(halves, targets, vocab_size=vocab).dtype == torch.float32
