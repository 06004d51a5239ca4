"""Sampling from a Megatron-Core GPTModel with its own static KV cache: the kit's one generator.

Used by GRPO rollout (on the training model itself, in its TP/EP layout) and by the evaluation
model's ``generate_until``. Pipeline parallelism is not supported (one model chunk).

Continuous batching on Megatron-Core's static KV cache, whose rows share one write position:
- up to ``slots`` sequences are in the cache, one batch row each; every step the live rows feed
  their last token at the shared position;
- a sequence that ends leaves at once: the last live rows move into the holes, so a step computes
  live rows only (varied response lengths cost what they generate, not the longest row's length);
- a freed slot takes the next prompt in the same step: its prompt is prefilled into its row, left-
  padded to end at the shared position; prompts admitted together share forwards, split by length
  where the padding saved outweighs a forward (_prefill_groups);
- when the cache's positions run out, the live rows' keys move back to the front;
- keys are cached rotated, so a step does not rotate the whole history again (models/kv_cache.py).
A row's keys before its first prompt token (padding, or an earlier sequence's) are masked
explicitly in every forward: Megatron-Core drops its causal mask after the first prefill, and torch
SDPA would align a causal mask top-left when query and key lengths differ. A row's positions are
offset by where it starts, which RoPE does not see: attention depends only on the distance between
query and key. Linears run through oneDNN on a CPU (models/onednn_linear.py).

Every process of a data-parallel group gives the same prompts and identically seeded generators,
so tensor-parallel ranks (which see the same gathered logits) sample the same tokens. Expert-
parallel ranks exchange tokens inside every forward, so all processes make the same forwards: a
process with no rows for a decode or prefill that another process makes feeds one token through a
scratch row. With a generator per prompt a sequence's tokens do not depend on the others in the
batch or on when it was admitted.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_patch.models import kv_cache
from megatron_patch.models.onednn_linear import onednn_linears
from megatron_patch.models.routing import recording
from megatron_patch.patches.cuda_on_cpu import cuda_on_cpu_paused


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


def _most_over_processes(values: tuple[int, ...], device) -> tuple[int, ...]:
    """Each value's largest over the processes of the job."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    tensor = torch.tensor(values, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(tensor.tolist())


# What one more forward costs, in tokens of another forward: it reads every weight once more (the
# output layer's 151,936 rows included) for its few rows. Measured on CPU, fp32: 60-95 tokens' worth
# (0.6B shape, 28 and 4 layers); more on a GPU, where a token costs less against reading the weights.
FORWARD_COST_TOKENS = 128


def _prefill_groups(lengths: list[int], forward_cost: int = FORWARD_COST_TOKENS) -> list[int]:
    """Sizes of the prefill forwards for prompts sorted longest first (a forward pads its rows to its
    first): the split with the fewest padded tokens plus ``forward_cost`` per forward. Prompts of one
    length never gain from a split between them, so the search runs over the distinct lengths."""
    counts = Counter(lengths)
    distinct = sorted(counts, reverse=True)
    before = [0]  # before[i]: how many prompts are longer than distinct[i]
    for length in distinct:
        before.append(before[-1] + counts[length])
    # best[i]: (cost, distinct lengths in the last forward) of the prompts of the first i lengths
    best = [(0, 0)] + [None] * len(distinct)
    for end in range(1, len(distinct) + 1):
        best[end] = min((best[first][0] + distinct[first] * (before[end] - before[first]) + forward_cost, end - first)
                        for first in range(end))
    sizes, end = [], len(distinct)
    while end:
        first = end - best[end][1]
        sizes.append(before[end] - before[first])
        end = first
    return sizes[::-1]


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


@dataclass
class _Outputs:
    """What each sequence (by its index among the prompts) has produced so far."""

    tokens: list[list[int]]
    log_probs: list[list[float]]
    stopped: list[bool]
    routes: list[list[torch.Tensor]] | None


class _Rows:
    """The sequences in the KV cache, one batch row each: their prompt index, the cache position of
    their first prompt token, and the token each feeds next."""

    def __init__(self, device):
        self.sequences: list[int] = []
        self.starts = torch.zeros(0, dtype=torch.long, device=device)
        self.feeds = torch.zeros(0, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.sequences)

    def keep(self, order: list[int]) -> None:
        """Row i becomes what row order[i] was."""
        index = torch.tensor(order, dtype=torch.long, device=self.starts.device)
        self.sequences = [self.sequences[i] for i in order]
        self.starts, self.feeds = self.starts[index], self.feeds[index]

    def add(self, sequences: list[int], starts: torch.Tensor) -> None:
        self.sequences += sequences
        self.starts = torch.cat([self.starts, starts])
        self.feeds = torch.cat([self.feeds, torch.zeros_like(starts)])


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: Sampling, vocab_size: int,
             generator: torch.Generator | list[torch.Generator] | None = None,
             record_routing: bool = False, slots: int = 0) -> list[Completion]:
    """Complete every prompt (token ids) with ``model`` (a GPTModel, or DDP/Float16Module around one).

    ``vocab_size`` trims the padded vocabulary; ``generator`` is one for the batch, or one per prompt;
    ``record_routing`` keeps each token's experts (an MoE model) in ``Completion.routing``; ``slots``
    bounds the sequences generated at once (0: all): when one ends, the next prompt takes its place.
    Each process calls this together with the others of its job (see the module docstring); the
    model is put in eval mode and left there.
    """
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if isinstance(generator, list) and len(generator) != len(prompts):
        raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts")
    from megatron.core.inference.contexts import StaticInferenceContext

    gpt = _unwrapped(model)
    if not getattr(gpt, "pre_process", True) or not getattr(gpt, "post_process", True):
        raise ValueError("generation needs the whole model in one chunk (pipeline parallelism is not supported)")
    device = next(gpt.parameters()).device
    model.eval()
    count = len(prompts)
    slots = count if slots <= 0 else min(slots, count)
    longest = max(len(prompt) for prompt in prompts)
    # Positions one sequence can take; with more prompts than slots the cache has half that again as
    # room, and is shifted back when it fills (kv_cache.shift_back), at most once every span/2 steps.
    span = longest + sampling.max_new_tokens
    capacity = span if slots == count else span + span // 2
    scratch = slots  # the batch row of forwards made only to keep step with other processes
    context = StaticInferenceContext(max_batch_size=slots + 1, max_sequence_length=capacity)
    cache = kv_cache.allocate(gpt, context)
    padding = sampling.stop_token_ids[0] if sampling.stop_token_ids else 0
    stops = set(sampling.stop_token_ids)
    out = _Outputs([[] for _ in prompts], [[] for _ in prompts], [False] * count,
                   [[] for _ in prompts] if record_routing else None)
    pending = list(range(count))
    pending.reverse()  # popped from the end: prompt order
    rows = _Rows(device)
    position = longest - 1  # the cache position the next decode step writes; prefills end there too

    def forward(tokens, offset: int, row: int, masked):
        context.sequence_len_offset, context.batch_size_offset = offset, row
        logits = model(input_ids=tokens, position_ids=torch.arange(offset, offset + tokens.shape[1], device=device)
                       .expand_as(tokens), attention_mask=masked[:, None], inference_context=context,
                       runtime_gather_output=True)
        return logits[:, -1, :vocab_size].float()

    def masks(starts, first: int, end: int):
        """True = not attended: keys after the query, or before the row's first prompt token. A query
        before that (left padding) attends to itself only: a row of nothing but masked keys gives NaN."""
        queries = torch.arange(first, end, device=device)
        keys = torch.arange(end, device=device)
        masked = (keys > queries[:, None]) | (keys < starts[:, None, None])
        return masked & (keys != queries[:, None])

    def keep_step():
        """One token through the scratch row: expert-parallel ranks exchange tokens in every forward."""
        forward(torch.full((1, 1), padding, device=device), 0, scratch, torch.zeros(1, 1, 1, dtype=torch.bool,
                                                                                   device=device))

    def decode(count: int):
        """The first ``count`` rows feed their last token at ``position``."""
        context.enable_decode_mode()
        logits = forward(rows.feeds[:count, None], position, 0, masks(rows.starts[:count], position, position + 1))
        if recorder is not None:
            for row, routes in enumerate(recorder.routes(1, count).cpu()):
                out.routes[rows.sequences[row]].append(routes)
        return logits

    def prefill(first: int, count: int):
        """Rows ``first``..``first + count`` (just admitted) take their prompts, left-padded to end at ``position``."""
        context.enable_prefill_mode()
        admitted = rows.sequences[first:first + count]
        width = max(len(prompts[index]) for index in admitted)
        tokens = torch.full((len(admitted), width), padding, dtype=torch.long, device=device)
        for row, index in enumerate(admitted):
            tokens[row, width - len(prompts[index]):] = torch.tensor(prompts[index], device=device)
        begin = position + 1 - width
        logits = forward(tokens, begin, first, masks(rows.starts[first:first + count], begin, position + 1))
        if recorder is not None:
            for row, routes in enumerate(recorder.routes(width, len(admitted)).cpu()):
                out.routes[admitted[row]].append(routes[width - len(prompts[admitted[row]]):])
        return logits

    with recording(gpt) if record_routing else nullcontext() as recorder, _without_sequence_parallel(gpt), \
            onednn_linears(gpt), kv_cache.keys_rotated_once(gpt) as rotated, cuda_on_cpu_paused():
        logits = None
        while True:
            if logits is not None:
                # The rows that took a token last step draw the next (only they use their generator).
                own = generator if generator is None or isinstance(generator, torch.Generator) \
                    else [generator[index] for index in rows.sequences]
                rows.feeds, token_log_probs = next_tokens(logits, sampling, own)
                finished = []
                for row, (token, log_prob) in enumerate(zip(rows.feeds.tolist(), token_log_probs.tolist())):
                    index = rows.sequences[row]
                    out.tokens[index].append(token)
                    out.log_probs[index].append(log_prob)
                    out.stopped[index] = token in stops
                    if out.stopped[index] or len(out.tokens[index]) >= sampling.max_new_tokens:
                        finished.append(row)
                position += 1  # positions [0, position) are in the cache
                rows.keep(kv_cache.close_holes(cache, position, finished, len(rows)))
            going = len(rows)
            if not going:
                position = longest - 1  # an empty cache: start again at the front
            elif position >= capacity:
                shift = min(int(rows.starts.min()), position - (longest - 1))
                assert shift > 0, (position, capacity, rows.starts)  # span + span // 2 leaves room; see capacity
                kv_cache.shift_back(cache, position, shift, going, kv_cache.back_rotation_of(gpt, shift) if rotated
                                    else None, gpt.config.rotary_interleaved)
                rows.starts -= shift
                position -= shift
            admitted = sorted((pending.pop() for _ in range(min(slots - going, len(pending)))),
                              key=lambda index: -len(prompts[index]))
            lengths = [len(prompts[index]) for index in admitted]
            groups = _prefill_groups(lengths)
            if admitted:
                rows.add(admitted, position + 1 - torch.tensor(lengths, device=device))
            decoding, prefills = _most_over_processes((int(going > 0), len(groups)), device)
            if not (decoding or prefills):
                break
            # A process with no rows of its own for a forward that another process makes makes a keep step.
            made = []
            if decoding and going:
                made.append(decode(going))
            elif decoding:
                keep_step()
            first = going
            for group in range(prefills):
                if group < len(groups):
                    made.append(prefill(first, groups[group]))
                    first += groups[group]
                else:
                    keep_step()
            logits = torch.cat(made) if made else None
    completions = []
    for index in range(count):
        routing = torch.cat(out.routes[index])[:len(prompts[index]) + len(out.tokens[index]) - 1] \
            if record_routing else None
        completions.append(Completion(tokens=out.tokens[index], log_probs=out.log_probs[index],
                                      stopped=out.stopped[index], routing=routing))
    return completions

