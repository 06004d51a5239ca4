"""Sampling from a Megatron-Core GPTModel with its own static KV cache: the kit's one generator.

Used by GRPO rollout (on the training model itself, in its TP/EP layout) and by the evaluation
model's ``generate_until``. Pipeline parallelism is not supported (one model chunk).

Prompts of different lengths are left-padded to the longest and prefilled in one forward pass;
then every row takes one token a step, at the same position. Megatron-Core drops its causal mask
once the prefill is done (and torch SDPA would align a causal mask top-left when query and key
lengths differ), so the padding is masked explicitly, in the prefill and at every step: a padded
row attends to exactly its own tokens. Its positions are shifted by its padding, which RoPE does
not see: attention depends only on the distance between query and key.

Every process of a data-parallel group gives the same prompts and an identically seeded generator,
so tensor-parallel ranks (which see the same gathered logits) sample the same tokens. The steps
continue until no row on any process is still going, because expert-parallel ranks exchange
tokens inside every forward and must all call it the same number of times.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_patch.models.routing import ROUTE_DTYPE, recording


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens}: at least 1 token must be generated")
        if self.temperature < 0:
            raise ValueError(f"temperature {self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must be >= 0 (0 is off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def scale(self) -> float:
        """What the logits are divided by before log-probs are taken (verl's convention; greedy: 1)."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Completion:
    """One row's generated tokens (the stop token included when one ended it) and their log-probs."""

    tokens: list[int]
    log_probs: list[float]
    stopped: bool  # a stop token ended it (else it ran to max_new_tokens)
    # With record_routing: the experts each input token of prompt + tokens[:-1] took in every MoE layer,
    # [positions, layers, top-k] (models/routing.py), what a training forward of the sequence would replay.
    routing: torch.Tensor | None = None

    @property
    def truncated(self) -> bool:
        return not self.stopped


def sampling_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _filtered(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature-scaled logits [rows, vocab] with what top-k and top-p leave out set to -inf."""
    logits = logits / sampling.scale
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        # Drop a token once the tokens before it already hold top_p of the mass (the first always stays).
        before = torch.softmax(ordered, dim=-1).cumsum(dim=-1) - torch.softmax(ordered, dim=-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= sampling.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _uniforms(generators, rows: int, device) -> torch.Tensor:
    """One uniform draw per row: from one generator for the batch, or from each row's own."""
    if generators is None or isinstance(generators, torch.Generator):
        origin = generators.device if generators is not None else device
        return torch.rand(rows, generator=generators, device=origin).to(device)
    if len(generators) != rows:
        raise ValueError(f"{len(generators)} generators for {rows} rows")
    return torch.cat([torch.rand(1, generator=g, device=g.device).to(device) for g in generators])


def next_tokens(logits: torch.Tensor, sampling: Sampling, generators=None):
    """(tokens [rows], their log-probs [rows]) from fp32 logits [rows, vocab].

    Sampling inverts each row's cumulative distribution at one uniform draw, so a row's token
    depends only on its own distribution and generator: with a generator per row (GRPO: one per
    sample), the same samples come out whatever the batch or the parallel layout around them.
    The log-prob is of the unfiltered temperature-scaled distribution: what the training pass
    computes for the same token, so the two can be compared (and clipped) as ratios.
    """
    log_probs = torch.log_softmax(logits / sampling.scale, dim=-1)
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        cumulative = torch.softmax(_filtered(logits, sampling), dim=-1).cumsum(dim=-1)
        targets = _uniforms(generators, logits.shape[0], logits.device) * cumulative[:, -1]
        tokens = torch.searchsorted(cumulative, targets.unsqueeze(-1)).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _most_over_processes(value: int, device) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _any_process(flag: bool, device) -> bool:
    return _most_over_processes(int(flag), device) > 0


@contextmanager
def _without_sequence_parallel(model):
    """Sequence parallelism off outside the MoE layers while generating, as Megatron-Core's own
    static-batching controller does (0.16.1): a one-token step cannot be split over TP ranks."""
    if not model.config.sequence_parallel:
        yield
        return
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    set_model_to_sequence_parallel(model, False, exclude_modules=[BaseMoELayer])
    try:
        yield
    finally:
        set_model_to_sequence_parallel(model, True, exclude_modules=[BaseMoELayer])


def _unwrapped(model):
    while hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: Sampling, vocab_size: int,
             generator: torch.Generator | list[torch.Generator] | None = None,
             record_routing: bool = False) -> list[Completion]:
    """Complete every prompt (token ids) with ``model`` (a GPTModel, or DDP/Float16Module around one).

    ``vocab_size`` trims the padded vocabulary; ``generator`` is one for the batch, or one per prompt;
    ``record_routing`` keeps each token's experts (an MoE model) in ``Completion.routing``.
    Each process calls this together with the others of its job (see the module docstring); the
    model is put in eval mode and left there.
    """
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    from megatron.core.inference.contexts import StaticInferenceContext

    gpt = _unwrapped(model)
    if not getattr(gpt, "pre_process", True) or not getattr(gpt, "post_process", True):
        raise ValueError("generation needs the whole model in one chunk (pipeline parallelism is not supported)")
    device = next(gpt.parameters()).device
    model.eval()
    lengths = [len(prompt) for prompt in prompts]
    rows, longest = len(prompts), max(lengths)
    # Every process steps as often as the largest token budget anywhere needs (expert ranks exchange
    # tokens in every forward); a process whose rows are done feeds padding until then.
    capacity = longest + _most_over_processes(sampling.max_new_tokens, device)
    context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=capacity)
    padding = sampling.stop_token_ids[0] if sampling.stop_token_ids else 0
    sequence = torch.full((rows, capacity), padding, dtype=torch.long, device=device)
    is_padding = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        sequence[row, longest - len(prompt):longest] = torch.tensor(prompt, device=device)
        is_padding[row, :longest - len(prompt)] = True
    stops = torch.tensor(sampling.stop_token_ids or [-1], device=device)
    generated = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    log_probs = torch.zeros(rows, capacity, dtype=torch.float32, device=device)
    routes = None

    def step(start: int, end: int) -> torch.Tensor:
        """Feed positions [start, end) of every row; the logits of the last one. Masks: True = not attended."""
        queries = torch.arange(start, end, device=device)
        keys = torch.arange(end, device=device)
        masked = (keys > queries[:, None]) | is_padding[:, None, :end]
        # A padding query attends to itself only (a row of nothing but masked keys would give NaN).
        masked &= keys != queries[:, None]
        tokens = sequence[:, start:end]
        logits = model(input_ids=tokens, position_ids=queries.expand_as(tokens), attention_mask=masked[:, None],
                       inference_context=context, runtime_gather_output=True)
        context.increment_sequence_len_offset(end - start)
        if record_routing:
            routes[:, start:end] = recorder.routes(end - start, rows).cpu()
        return logits[:, -1, :vocab_size].float()

    position = longest
    with recording(gpt) if record_routing else nullcontext() as recorder:
        if record_routing:
            routes = torch.zeros(rows, capacity, recorder.layers, gpt.config.moe_router_topk, dtype=ROUTE_DTYPE)
        with _without_sequence_parallel(gpt):
            logits = step(0, longest)
            context.enable_decode_mode()
            while True:
                # Rows still generating draw a token (and only they use their generator).
                choosing = torch.nonzero(~finished).squeeze(-1)
                own = generator if generator is None or isinstance(generator, torch.Generator) \
                    else [generator[row] for row in choosing.tolist()]
                tokens, token_log_probs = next_tokens(logits[choosing], sampling, own)
                sequence[choosing, position] = tokens
                log_probs[choosing, position] = token_log_probs
                generated[choosing] += 1
                stopped[choosing] |= torch.isin(tokens, stops)
                finished |= stopped | (generated >= sampling.max_new_tokens)
                if not _any_process(bool((~finished).any()), device):
                    break
                logits = step(position, position + 1)
                position += 1
    sequence, log_probs = sequence.cpu(), log_probs.cpu()
    completions = []
    for row, prompt in enumerate(prompts):
        end = longest + int(generated[row])
        # The inputs of a forward over prompt + response[:-1]: from the row's first prompt token on.
        routing = None if routes is None else routes[row, longest - len(prompt):end - 1].clone()
        completions.append(Completion(tokens=sequence[row, longest:end].tolist(),
                                      log_probs=log_probs[row, longest:end].tolist(),
                                      stopped=bool(stopped[row]), routing=routing))
    return completions


def generate_in_batches(model, prompts: list[list[int]], sampling: Sampling, vocab_size: int,
                        generator: torch.Generator | list[torch.Generator] | None = None,
                        batch: int = 0, record_routing: bool = False) -> list[Completion]:
    """``generate`` on at most ``batch`` prompts at a time (0: all at once), which bounds the KV cache and
    the prefill. Every process makes as many calls as the one that needs the most; a process with no
    prompts left for a call repeats its first one greedily and drops the result."""
    if batch <= 0:
        return generate(model, prompts, sampling, vocab_size, generator, record_routing)
    device = next(_unwrapped(model).parameters()).device
    calls = _most_over_processes(-(-len(prompts) // batch), device)
    completions = []
    for call in range(calls):
        part = slice(call * batch, (call + 1) * batch)
        if not prompts[part]:
            generate(model, prompts[:1], dataclasses.replace(sampling, temperature=0.0), vocab_size)
            continue
        own = generator[part] if isinstance(generator, list) else generator
        completions += generate(model, prompts[part], sampling, vocab_size, own, record_routing)
    return completions
