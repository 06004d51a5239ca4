"""Sampling from a Megatron-Core GPTModel with a KV cache: the kit's one generator.

Used by GRPO rollout (on the training model itself, in its TP/EP layout) and by the evaluation
model's ``generate_until``. Pipeline parallelism is not supported (one model chunk).

Continuous batching in one forward per step, on the key/value memory of Megatron-Core's static
inference context (one batch row per sequence, one write position shared by the rows):
- up to ``slots`` sequences are in the cache; every step the live rows feed their last token at the
  shared position, and prompts admitted this step feed their whole prompts, ending at that
  position, in the *same* forward: its tokens are packed [1, tokens] (models/kv_cache.RaggedStep),
  so no linear computes padding, and a refill does not read the weights again;
- a sequence that ends leaves at once: the last live rows move into the holes, so a step computes
  live rows only (varied response lengths cost what they generate, not the longest row's length);
- a prompt admitted several times at once (GRPO's samples of one prompt) is computed once, and its
  other rows take that row's keys, values and logits;
- when the cache's positions run out, the live rows' keys move back to the front;
- keys are cached rotated at their own positions, so a step does not rotate the history again.
A row's keys before its first prompt token (an earlier sequence's) are masked. A row's positions
are offset by where it starts, which RoPE does not see: attention depends only on the distance
between query and key. Linears run through oneDNN on a CPU (models/onednn_linear.py).

Every process of a data-parallel group gives the same prompts and identically seeded generators,
so tensor-parallel ranks (which see the same gathered logits) sample the same tokens. Expert-
parallel ranks exchange tokens inside every forward, so all processes make the same forwards: a
process with no rows while another computes feeds one token through a scratch row. With a
generator per prompt a sequence's tokens do not depend on the others in the batch or on when it
was admitted.
"""

from __future__ import annotations

from collections.abc import Callable
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
             record_routing: bool = False, slots: int = 0,
             on_finish: Callable[[int, list[int], bool], None] | None = None) -> list[Completion]:
    """Complete every prompt (token ids) with ``model`` (a GPTModel, or DDP/Float16Module around one).

    ``vocab_size`` trims the padded vocabulary; ``generator`` is one for the batch, or one per prompt;
    ``record_routing`` keeps each token's experts (an MoE model) in ``Completion.routing``; ``slots``
    bounds the sequences generated at once (0: all): when one ends, the next prompt takes its place.
    ``on_finish(index, tokens, stopped)`` is told of each sequence as it ends (GRPO scores it while the
    others go on). Each process calls this together with the others of its job (see the module docstring); the
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
    context.enable_prefill_mode()  # Megatron-Core's decode-only paths are not the ragged step's
    cache = kv_cache.allocate(gpt, context)
    padding = sampling.stop_token_ids[0] if sampling.stop_token_ids else 0
    stops = set(sampling.stop_token_ids)
    out = _Outputs([[] for _ in prompts], [[] for _ in prompts], [False] * count,
                   [[] for _ in prompts] if record_routing else None)
    pending = list(range(count))
    pending.reverse()  # popped from the end: prompt order
    rows = _Rows(device)
    position = longest - 1  # the cache position the next step's decode tokens write; new prompts end there too

    def forward(step: kv_cache.RaggedStep, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocabulary] of each row's last token in ``step``."""
        context.ragged = step
        try:
            logits = model(input_ids=tokens[None], position_ids=step.positions[None], attention_mask=None,
                           inference_context=context, runtime_gather_output=True)
        finally:
            context.ragged = None
        return logits[0, :, :vocab_size].float()

    def keep_step():
        """One token through the scratch row: expert-parallel ranks exchange tokens in every forward."""
        forward(kv_cache.RaggedStep(0, 0, scratch, [1], torch.zeros(0, dtype=torch.long, device=device)),
                torch.full((1,), padding, device=device))

    def step(going: int, fed: list[int], copies: list[tuple[int, int]]) -> torch.Tensor:
        """The first ``going`` rows feed their last token, the ``fed`` sequences (the rows after them) their
        prompts: one forward. Then each of ``copies`` (sequence, row of the same prompt among ``fed``), in the
        rows after those, takes that row's cache and logits."""
        lengths = [len(prompts[index]) for index in fed]
        tokens = torch.cat([rows.feeds[:going]] + [torch.tensor(prompts[index], device=device) for index in fed])
        logits = forward(kv_cache.RaggedStep(going, position, going, lengths, rows.starts), tokens)
        if copies:
            sources = [source for _, source in copies]
            targets = list(range(going + len(fed), going + len(fed) + len(copies)))
            kv_cache.copy_rows(cache, slice(position + 1 - max(lengths), position + 1), sources, targets)
            logits = torch.cat([logits, logits[sources]])
        if recorder is not None:
            routes = recorder.routes(len(tokens), 1)[0].cpu()
            for row in range(going):
                out.routes[rows.sequences[row]].append(routes[row:row + 1])
            first, prompt_routes = going, {}
            for row, (index, length) in enumerate(zip(fed, lengths), start=going):
                out.routes[index].append(prompt_routes.setdefault(row, routes[first:first + length]))
                first += length
            for index, source in copies:
                out.routes[index].append(prompt_routes[source])
        return logits

    with recording(gpt) if record_routing else nullcontext() as recorder, _without_sequence_parallel(gpt), \
            onednn_linears(gpt), kv_cache.ragged_forwards(gpt, context), cuda_on_cpu_paused():
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
                        if on_finish is not None:
                            on_finish(index, out.tokens[index], out.stopped[index])
                position += 1  # positions [0, position) are in the cache
                rows.keep(kv_cache.close_holes(cache, position, finished, len(rows)))
            going = len(rows)
            if not going:
                position = longest - 1  # an empty cache: start again at the front
            elif position >= capacity:
                shift = min(int(rows.starts.min()), position - (longest - 1))
                assert shift > 0, (position, capacity, rows.starts)  # span + span // 2 leaves room; see capacity
                kv_cache.shift_back(cache, position, shift, going, kv_cache.back_rotation_of(gpt, shift),
                                    gpt.config.rotary_interleaved)
                rows.starts -= shift
                position -= shift
            admitted = [pending.pop() for _ in range(min(slots - going, len(pending)))]
            # A prompt admitted more than once (GRPO's samples of one prompt) is computed once; its other
            # sequences take the cache rows and logits of the first, in the rows after the computed ones.
            fed, copies, row_of = [], [], {}
            for index in admitted:
                prompt = tuple(prompts[index])
                if prompt in row_of:
                    copies.append((index, row_of[prompt]))
                else:
                    row_of[prompt] = going + len(fed)
                    fed.append(index)
            admitted = fed + [index for index, _ in copies]
            if admitted:
                rows.add(admitted, position + 1 - torch.tensor([len(prompts[i]) for i in admitted], device=device))
            # A process with nothing to compute while another computes makes a keep step.
            (busy,) = _most_over_processes((int(going > 0 or bool(admitted)),), device)
            if not busy:
                break
            if going or admitted:
                logits = step(going, fed, copies)
            else:
                keep_step()
                logits = None
    completions = []
    for index in range(count):
        routing = torch.cat(out.routes[index])[:len(prompts[index]) + len(out.tokens[index]) - 1] \
            if record_routing else None
        completions.append(Completion(tokens=out.tokens[index], log_probs=out.log_probs[index],
                                      stopped=out.stopped[index], routing=routing))
    return completions

