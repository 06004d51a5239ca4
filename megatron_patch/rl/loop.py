"""The GRPO loop on the kit's engine: rollout -> rewards -> advantages -> (old) -> (reference) -> updates.

Each step, every data-parallel rank takes its share of ``--global-batch-size`` prompts, samples
``--samples-per-prompt`` responses to each with the training model itself (``models/generation.py``,
Megatron-Core's KV cache, in the run's TP/EP layout), scores them, and trains on them with the
kit's DDP and optimizer (``training/steps.train_step`` with a policy-loss forward step).

Reproducible and resumable by construction: the prompt order is a permutation seeded per epoch,
and each sample of step s has a generator seeded from (seed, s, its place in the global batch), so
a checkpoint needs only the step (its ``consumed_samples`` is the prompt position) besides weights
and optimizer, and the samples do not depend on the data-parallel or expert-parallel layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.lora.apply import adapters_disabled
from megatron_patch.models.generation import Completion, Sampling, generate, sampling_generator
from megatron_patch.models.log_probs import token_entropy, token_log_probs
from megatron_patch.models.routing import RoutingRecorder, RoutingReplay, differing_routes, recording
from megatron_patch.rl.config import GrpoSettings, training_view
from megatron_patch.rl.objectives import (
    POLICY_LOSSES,
    aggregate_parts,
    group_advantages,
    kl_penalty,
    masked_importance_keep,
    rollout_correction,
    rollout_mismatch,
)
from megatron_patch.rl.prompts import Prompt, read_prompt_files
from megatron_patch.rl.reward_worker import Scorer
from megatron_patch.rl.rollout_log import RolloutLog
from megatron_patch.rl.tool_rollout import tool_rollout
from megatron_patch.rl.tools import Tools
from megatron_patch.rl.vllm_engine import VllmEngine, generate_on_rank_zero, hf_weight_buckets, vllm_python
from megatron_patch.training.checkpointing import load_checkpoint
from megatron_patch.training.config import TrainConfig, TrainConfigError
from megatron_patch.training.loop import finish_outputs, save_model
from megatron_patch.training.metrics import MetricsWriter, Stopwatch, memory_peak_gib
from megatron_patch.training.setup import TrainedModel, load_start, prepare_model
from megatron_patch.training.steps import synchronized_parameters, train_step


@dataclass
class Rollout:
    """One rank's sequences of a step: prompt + response token ids and what the loss needs of each."""

    prompts: list[Prompt]  # one per sequence (a prompt repeated samples-per-prompt times)
    responses: list[list[int]]
    rollout_log_probs: list[list[float]]
    truncated: list[bool]
    rewards: torch.Tensor  # [sequences]
    advantages: torch.Tensor  # [sequences]
    in_loss: torch.Tensor  # [sequences] bool: dynamic sampling leaves equal-reward groups out
    reward_extras: list[dict[str, float]]  # per sequence: the reward dict's other numbers
    routing: list[torch.Tensor] | None  # per sequence (MoE, TP 1): its inputs' experts, [positions, layers, top-k]
    # With --tools: per sequence, 1 on the model's response tokens and 0 on inserted tool turns; the turns
    # after the prompt ({"role", "content"}); its tool calls and tool errors.
    model_masks: list[list[int]] | None = None
    turns: list[list[dict]] | None = None
    tool_stats: list[dict[str, float]] | None = None


def _dp() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_prompts(prompts: list[Prompt], step: int, prompts_per_step: int, seed: int) -> list[Prompt]:
    """This rank's prompts of ``step`` (0-based): positions step*G ... in a per-epoch seeded order."""
    rank, size = _dp()
    local = prompts_per_step // size
    first = step * prompts_per_step + rank * local
    return [prompts[_epoch_order(seed, position // len(prompts), len(prompts))[position % len(prompts)]]
            for position in range(first, first + local)]


def sample_seeds(seed: int, step: int, prompts_per_step: int, samples: int) -> list[int]:
    """One seed per sequence of this rank, from the sequence's place in the step's global batch: the
    same samples whatever the data-parallel layout (and on a rerun or resume)."""
    rank, size = _dp()
    first = rank * (prompts_per_step // size) * samples
    count = prompts_per_step // size * samples
    base = (seed * 1_000_003 + step * 7_919 * prompts_per_step * samples) % (2**62)
    return [base + index for index in range(first, first + count)]


def overlong_shaped(reward: float, length: int, settings: GrpoSettings) -> float:
    """DAPO's soft overlong penalty: linear over the last ``overlong_buffer`` tokens of the budget."""
    if not settings.overlong_buffer:
        return reward
    start = settings.max_response_length - settings.overlong_buffer
    excess = max(0, length - start)
    return reward - settings.overlong_penalty * min(excess / settings.overlong_buffer, 1.0)


# What each micro-batch's report sums over every update: the loss's numerator and denominator, clipped tokens,
# KL and entropy sums, tokens in the loss, and over the response tokens the rollout mismatch (k3 sum, tokens
# beyond --tis-cap, tokens masked importance sampling dropped, their count). Then what only the first update
# sums, whose weights are the rollout's: token-layers whose experts differ from the rollout's, of those
# compared; then the largest |ratio - 1|.
REPORT_SUMS = ("loss", "loss_norm", "clipped", "kl", "entropy", "tokens", "rollout_kl", "beyond_cap", "mis_dropped",
               "response_tokens")
FIRST_UPDATE_SUMS = ("routing_differ", "routing_compared")


def _with_numbers(loss, low: float, high: float, extra: dict, logp, old, advantages, mask):
    """``loss`` with its two numbers (--clip-low, --clip-high; SAPO's temperatures) in their places."""
    return loss(logp, old, advantages, mask, low, high, **extra)


class GrpoTrainer:
    """One process's share of a GRPO run."""

    def __init__(self, config: TrainConfig, settings: GrpoSettings,
                 prompts: tuple[list[Prompt], list[Prompt]] | None = None):
        """``config`` as given (--global-batch-size in prompts); the model is built from its training view.
        ``prompts``: (training, validation) prompts already read, else read here."""
        self.config, self.settings = config, settings
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.model: TrainedModel = prepare_model(training_view(config, settings, world))
        model = self.model
        self.reward = Scorer(settings.reward, settings.reward_timeout, settings.reward_workers)
        self.rollout_log = RolloutLog(settings.rollout_log) if settings.rollout_log else None
        self.tools = Tools(settings.tools, settings.tool_timeout) if settings.tools else None
        # Per-token (loss, clipped) of (logp, old, advantages, mask); its two numbers as the loss names them.
        loss, _, _ = POLICY_LOSSES[settings.policy_loss]
        extra = {"dual_clip": settings.dual_clip} if settings.policy_loss == "ppo-clip" else {}
        self.policy_loss = functools.partial(_with_numbers, loss, *settings.clips, extra)
        tokenizer = model.tokenizer
        self.stop_ids = tuple(dict.fromkeys([tokenizer.im_end, tokenizer.eod]))
        if prompts is None:
            prompts = read_prompt_files(config, settings, tokenizer, self.reward.needs_label,
                                        self.tools.schemas if self.tools else ())
        self.prompts, self.valid_prompts = prompts
        # The reference policy: adapters switched off (LoRA), or the starting weights kept on the CPU.
        self.reference = None
        if settings.kl_coef > 0 and model.lora is None:
            if config.load:  # a resumed run's reference is still its starting policy
                load_checkpoint(config.load, model.chunks, None, None, load_optim=False, arch=model.arch)
            self.reference = [p.detach().to("cpu", copy=True) for p in self._parameters()]
        self.loaded = load_start(model)
        self.sampling = Sampling(max_new_tokens=settings.max_response_length, temperature=settings.temperature,
                                 top_p=settings.top_p, top_k=settings.top_k, stop_token_ids=self.stop_ids)
        # Each token's experts: recorded in the rollout (by the generator, or by vLLM's engine) and read off
        # the training forward (routing_mismatch) for an MoE model whose routers see whole sequences (TP 1),
        # replayed with --routing-replay.
        self.records_routing = model.arch.is_moe and config.tensor_model_parallel_size == 1
        if settings.routing_replay and not model.arch.is_moe:
            raise TrainConfigError(f"--routing-replay is for MoE models; {config.model} is dense")
        self.routes_used: RoutingRecorder | None = None  # during a step's training forwards (_training_forwards)
        self.replay = RoutingReplay(self._policy()) if settings.routing_replay else None
        # vLLM runs beside global rank 0, which every rank sends its shards and prompts to.
        self.uses_vllm = settings.rollout_engine == "vllm"
        self.engine = self._start_engine() if self.uses_vllm and dist.get_rank() == 0 else None

    def _start_engine(self) -> VllmEngine:
        """The vLLM engine, on global rank 0 only."""
        config, settings = self.config, self.settings
        log_dir = config.log_dir or config.save or "."
        gpus, tensor_parallel = (), settings.vllm_tensor_parallel_size
        if settings.rollout_gpus:  # disaggregated: the GPUs after the trainer's on this node
            if self.model.device == "cpu":
                raise TrainConfigError("--rollout-gpus gives vLLM GPUs of its own: this run has none (CPU)")
            first = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            gpus, tensor_parallel = tuple(range(first, first + settings.rollout_gpus)), settings.rollout_gpus
        engine = VllmEngine(
            self.model.arch, vllm_python(settings.vllm_python), max_model_len=config.seq_length,
            dtype="float32" if config.weights_precision == "fp32" else "bfloat16",
            log_path=Path(log_dir) / "vllm.log", max_num_seqs=settings.vllm_max_num_seqs,
            tensor_parallel_size=tensor_parallel, memory_fraction=settings.vllm_memory_fraction,
            kv_cache_gib=settings.vllm_kv_cache_gib, enforce_eager=settings.vllm_enforce_eager,
            routing=self.records_routing, sleep=settings.vllm_sleep, gpus=gpus, idle_timeout=settings.engine_timeout)
        print(f"vLLM engine started in {engine.startup_seconds:.1f} s (pid {engine.process.pid}, log "
              f"{engine.log_path})", flush=True)
        return engine

    def close(self) -> None:
        """Stop what the trainer started beside it (the vLLM engine, a custom reward's process)."""
        if self.engine is not None:
            self.engine.close()
        self.reward.close()
        if self.tools is not None:
            self.tools.close()

    def sync_weights(self) -> None:
        """The current weights into the vLLM engine, in HF names through the converter's mapping, a bucket at a
        time (every rank sends its shards of each to rank 0), LoRA adapters merged."""
        with synchronized_parameters(self.model.ddp_chunks):
            lora = self.model.lora
            buckets = hf_weight_buckets(self.model.chunks, self.model.arch, self.settings.vllm_sync_bucket_mb * 2**20,
                                        lora_scale=None if lora is None else lora.settings.scale)
            if self.engine is not None:
                self.engine.sync(buckets)
            else:
                for _ in buckets:  # this rank's part of each bucket's gather
                    pass

    @contextmanager
    def _training_forwards(self):
        """The block of a step's training forwards: ``routes_used`` reads the experts they take (for
        ``routing_mismatch``; the rollout's routes the generator records itself), and the replayed
        routes (--routing-replay) are released at its end."""
        try:
            if not self.records_routing:
                yield
                return
            with recording(self._policy()) as self.routes_used:
                yield
        finally:
            self.routes_used = None
            if self.replay is not None:
                self.replay.release()

    # --- pieces of a step ------------------------------------------------------------------------------
    def _parameters(self):
        return [p for chunk in self.model.chunks for p in chunk.parameters()]

    def _policy(self):
        return self.model.chunks[0]

    def rollout(self, step: int) -> Rollout:
        settings = self.settings
        prompts = [p for p in step_prompts(self.prompts, step, self.config.global_batch_size, self.config.seed)
                   for _ in range(settings.samples_per_prompt)]
        seeds = sample_seeds(self.config.seed, step, self.config.global_batch_size, settings.samples_per_prompt)

        def score(index: int, tokens: list[int], stopped: bool) -> None:
            """Hand a finished response to the reward (scored while the others go on)."""
            prompt = prompts[index]
            text = self.model.tokenizer.backend.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=False)
            self.reward.submit(index, prompt.text, text, prompt.label,
                               where=f"{prompt.where} (sample {index % settings.samples_per_prompt + 1})",
                               data_source=prompt.data_source, extra_info=prompt.extra_info)

        if self.tools is not None:
            return self._tool_rollout(prompts, seeds, score)
        if self.uses_vllm:
            sender = parallel_state.get_tensor_model_parallel_rank() == 0
            completions = generate_on_rank_zero(self.engine, [list(p.tokens) for p in prompts], seeds, self.sampling,
                                                (_dp()[0], sender))
            for index, completion in enumerate(completions):
                score(index, completion.tokens, completion.stopped)
        else:
            generators = [sampling_generator(seed) for seed in seeds]
            with synchronized_parameters(self.model.ddp_chunks):
                completions = generate(
                    self._policy(), [list(p.tokens) for p in prompts], self.sampling, self.model.arch.vocab_size,
                    generators, record_routing=self.records_routing, slots=settings.rollout_batch, on_finish=score)
        return self._scored(prompts, completions)

    def _scored(self, prompts: list[Prompt], completions: list, **tools) -> Rollout:
        """The rollout of these completions, their scores collected, advantages computed; ``tools``: the tool
        fields of Rollout."""
        settings = self.settings
        scores = self.reward.collect()
        rewards = [overlong_shaped(scores[i].value, len(c.tokens), settings) for i, c in enumerate(completions)]
        extras = [scores[i].extras for i in range(len(completions))]
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        groups = rewards_t.view(-1, settings.samples_per_prompt)
        advantages = group_advantages(groups, settings.advantage_estimator).view(-1)
        in_loss = torch.ones_like(rewards_t, dtype=torch.bool)
        if settings.dynamic_sampling:
            in_loss = (groups.max(dim=1).values > groups.min(dim=1).values).repeat_interleave(
                settings.samples_per_prompt)
        return Rollout(prompts, [c.tokens for c in completions], [c.log_probs for c in completions],
                       [c.truncated for c in completions], rewards_t, advantages, in_loss, extras,
                       [c.routing for c in completions] if self.records_routing else None, **tools)

    def _tool_rollout(self, prompts: list[Prompt], seeds: list[int], score) -> Rollout:
        """Multi-turn trajectories with tool calls (rl/tool_rollout.py) on either engine; each is scored whole."""
        settings, tokenizer = self.settings, self.model.tokenizer
        generators = [sampling_generator(seed) for seed in seeds]

        def generate_turn(indices: list[int], contexts: list[list[int]], budget: int, turn: int) -> list[Completion]:
            sampling = dataclasses.replace(self.sampling, max_new_tokens=budget)
            if self.uses_vllm:
                sender = parallel_state.get_tensor_model_parallel_rank() == 0
                return generate_on_rank_zero(self.engine, contexts, [(seeds[i] + 7919 * turn) % 2**31 for i in indices],
                                             sampling, (_dp()[0], sender))
            # A process whose sequences have all ended keeps step with the others on a one-token filler.
            filler = not contexts
            with synchronized_parameters(self.model.ddp_chunks):
                made = generate(self._policy(), [[self.stop_ids[0]]] if filler else contexts, sampling,
                                self.model.arch.vocab_size,
                                [sampling_generator(0)] if filler else [generators[i] for i in indices],
                                record_routing=self.records_routing, slots=settings.rollout_batch)
            return [] if filler else made

        def anyone_going(mine: bool) -> bool:
            flag = torch.tensor([float(mine)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        trajectories = tool_rollout(
            generate_turn, [list(p.tokens) for p in prompts], settings.max_response_length, self.tools, tokenizer,
            tokenizer.im_end, settings.max_turns, settings.enable_thinking,
            where=lambda i: f"{prompts[i].where} (sample {i % settings.samples_per_prompt + 1})",
            anyone_going=anyone_going)
        for index, trajectory in enumerate(trajectories):
            score(index, trajectory.tokens, trajectory.stopped)  # the whole trajectory, tool turns included
        completions = [Completion(t.tokens, t.log_probs, t.stopped, t.routing) for t in trajectories]
        return self._scored(prompts, completions, model_masks=[t.model_mask for t in trajectories],
                            turns=[t.turns for t in trajectories],
                            tool_stats=[{"tool_calls": t.tool_calls, "tool_errors": t.tool_errors}
                                        for t in trajectories])

    def _log_records(self, rollout: Rollout, step: int) -> list[dict]:
        """This rank's sequences of the step as --rollout-log records (rl/rollout_log.py)."""
        records = []
        decode = self.model.tokenizer.backend.decode
        for index, (prompt, response) in enumerate(zip(rollout.prompts, rollout.responses)):
            trained = int(bool(rollout.in_loss[index]))
            model = rollout.model_masks[index] if rollout.model_masks is not None else [1] * len(response)
            if rollout.turns is not None:
                turns = rollout.turns[index]
            else:
                text = decode(response if rollout.truncated[index] else response[:-1], skip_special_tokens=False)
                turns = [{"role": "assistant", "content": text}]
            records.append({
                "prompt": prompt.where, "messages": [*prompt.messages, *turns],
                "tokens": [*prompt.tokens, *response],
                "loss_mask": [0] * len(prompt.tokens) + [trained * m for m in model],
                "log_probs": [lp if m else None for lp, m in zip(rollout.rollout_log_probs[index], model)],
                "reward": float(rollout.rewards[index]),
                "reward_extras": rollout.reward_extras[index], "policy_version": step,
                "engine": self.settings.rollout_engine})
        return records

    def _micro_batches(self, rollout: Rollout, indices: list[int]) -> list[dict]:
        """Right-padded micro-batches of ``indices``: tokens, targets, the response mask and per-sequence values."""
        size = self.config.micro_batch_size
        # Sequence parallelism splits the sequence over TP ranks.
        multiple = max(8, self.config.tensor_model_parallel_size)
        batches = []
        for start in range(0, len(indices), size):
            rows = indices[start:start + size]
            sequences = [list(rollout.prompts[i].tokens) + rollout.responses[i] for i in rows]
            width = -(-max(len(s) for s in sequences) // multiple) * multiple
            tokens = torch.zeros(len(rows), width + 1, dtype=torch.long)
            mask = torch.zeros(len(rows), width)
            response = torch.zeros(len(rows), width, dtype=torch.bool)
            rollout_logp = torch.zeros(len(rows), width)
            for row, (index, sequence) in enumerate(zip(rows, sequences)):
                tokens[row, :len(sequence)] = torch.tensor(sequence)
                begin = len(rollout.prompts[index].tokens) - 1  # the first target that is a response token
                end = begin + len(rollout.responses[index])
                mask[row, begin:end] = float(rollout.in_loss[index])
                if rollout.model_masks is not None:  # inserted tool turns are not the model's: not trained
                    mask[row, begin:end] *= torch.tensor(rollout.model_masks[index], dtype=mask.dtype)
                response[row, begin:end] = True
                rollout_logp[row, begin:end] = torch.tensor(rollout.rollout_log_probs[index])
            device = self.model.device
            responses = tuple(torch.nonzero(response, as_tuple=True))
            routes = {} if rollout.routing is None else \
                self._routes_batch([rollout.routing[i] for i in rows], width, device)
            batches.append(routes | {
                "tokens": tokens[:, :-1].to(device), "targets": tokens[:, 1:].to(device),
                "position_ids": torch.arange(width, device=device).expand(len(rows), width),
                "responses": tuple(index.to(device) for index in responses),
                "mask": mask.to(device), "rollout_log_probs": rollout_logp.to(device),
                "advantages": rollout.advantages[rows].to(device).unsqueeze(1),
            })
        return batches

    def _routes_batch(self, routes: list[torch.Tensor], width: int, device) -> dict:
        """``routing`` [rows, width, layers, top-k]: each input token's rollout experts (past a sequence's end,
        experts 0..k-1: padding, which no real token attends to); ``routed`` [rows, width]: where they are."""
        layers, topk = routes[0].shape[1:]
        routing = torch.arange(topk).expand(len(routes), width, layers, topk).clone()
        routed = torch.zeros(len(routes), width, dtype=torch.bool)
        for row, route in enumerate(routes):
            routing[row, :len(route)] = route.long()
            routed[row, :len(route)] = True
        return {"routing": routing.to(device), "routed": routed.to(device)}

    def _replaying(self, batch: dict) -> None:
        """The next forwards take ``batch``'s rollout experts (--routing-replay), until the step's end."""
        if self.replay is not None:
            self.replay.replay(batch["routing"])

    def _routing_mismatch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(token-layers whose experts differ from the rollout's, token-layers compared) in the latest forward."""
        if self.routes_used is None:
            return torch.zeros(()), torch.zeros(())
        rows, width = batch["routed"].shape
        differ, compared = differing_routes(self.routes_used.routes(width, rows).long(), batch["routing"],
                                            batch["routed"])
        return torch.tensor(float(differ)), torch.tensor(float(compared))

    def _response_log_probs(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Log-probs [rows, width] of the targets at response positions (0 elsewhere): the vocabulary
        work is done for response tokens only."""
        responses = batch["responses"]
        values = token_log_probs(logits[responses], batch["targets"][responses], self.sampling.scale,
                                 self.model.arch.vocab_size, self.settings.log_prob_chunk)
        return torch.zeros(batch["targets"].shape, dtype=values.dtype, device=values.device).index_put(
            responses, values)

    def _log_probs(self, batch: dict) -> torch.Tensor:
        self._replaying(batch)
        with torch.no_grad():
            logits = self._policy()(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                                    attention_mask=None)
            return self._response_log_probs(logits, batch)

    @contextmanager
    def _reference_weights(self):
        """The reference policy in place of the current one for the block."""
        if self.model.lora is not None:
            with adapters_disabled(self.model.chunks):
                yield
            return
        parameters = self._parameters()
        current = [p.detach().to("cpu", copy=True) for p in parameters]
        with torch.no_grad():
            for parameter, reference in zip(parameters, self.reference):
                parameter.copy_(reference)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, saved in zip(parameters, current):
                    parameter.copy_(saved)

    def _forward_step(self):
        settings, vocab = self.settings, self.model.arch.vocab_size
        temperature = self.sampling.scale

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            self._replaying(batch)
            logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)
            routing_differ, routing_compared = self._routing_mismatch(batch)

            def loss(logits):
                logp = self._response_log_probs(logits, batch)
                old = batch.get("old_log_probs", logp.detach())
                rollout_logp = batch["rollout_log_probs"]
                responses_in_loss = batch["mask"]
                # Mismatch corrections: what the rollout engine sampled with against the training forward
                # on the same weights (``old``).
                mask = responses_in_loss
                if settings.mis:
                    mask = mask * masked_importance_keep(old, rollout_logp, mask, settings.mis_low,
                                                         settings.mis_high, settings.mis_level)
                per_token, clipped = self.policy_loss(logp, old, batch["advantages"], responses_in_loss)
                if settings.tis:
                    per_token = per_token * rollout_correction(old, rollout_logp, settings.tis_cap)
                kl = torch.zeros_like(logp)
                if "ref_log_probs" in batch:
                    kl = kl_penalty(logp, batch["ref_log_probs"], settings.kl_estimator)
                    per_token = per_token + settings.kl_coef * kl
                numerator, denominator = aggregate_parts(per_token, mask, settings.aggregation,
                                                         settings.max_response_length)
                live = mask > 0
                drift = (logp.detach() - rollout_logp).exp().sub(1).abs()
                responses = batch["responses"]
                entropy = token_entropy(logits.detach()[responses], temperature, vocab, settings.log_prob_chunk)
                mismatch = rollout_mismatch(old, rollout_logp, responses_in_loss, settings.tis_cap)
                report = torch.stack([
                    numerator.detach(), denominator.float(), (clipped & live).sum().float(), (kl.detach() * mask).sum(),
                    (entropy * mask[responses]).sum(), mask.sum(), mismatch["rollout_kl"], mismatch["beyond_cap"],
                    mismatch["tokens"] - mask.sum(), mismatch["tokens"], routing_differ.to(logp.device),
                    routing_compared.to(logp.device), torch.where(live, drift, torch.zeros_like(drift)).max()])
                return numerator, denominator, {"lm loss": report[:2], "grpo": report}

            return logits, loss

        return forward_step

    # --- a step ----------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        settings, model = self.settings, self.model
        clock = Stopwatch()
        times = {}
        if self.uses_vllm:
            self.sync_weights()
            times["weight_sync"] = clock.lap()
        rollout = self.rollout(step)
        times["rollout"] = clock.lap()
        if self.rollout_log is not None:
            self.rollout_log.write(step + 1, self._log_records(rollout, step),
                                   contributes=parallel_state.get_tensor_model_parallel_rank() == 0)
        # Update u trains on the sequences whose place in the global batch is u modulo the updates:
        # each rank holds a contiguous share, so the split is the same in every data-parallel layout.
        order, count = list(range(len(rollout.responses))), settings.updates_per_rollout
        updates = [order[u::count] for u in range(count)]
        batches = [self._micro_batches(rollout, rows) for rows in updates]
        with self._training_forwards():
            with synchronized_parameters(model.ddp_chunks):
                for chunk in model.chunks:
                    chunk.eval()
                if settings.updates_per_rollout > 1:
                    for batch in (b for update in batches for b in update):
                        batch["old_log_probs"] = self._log_probs(batch)
                times["log_probs"] = clock.lap()
                if settings.kl_coef > 0:
                    with self._reference_weights():
                        for batch in (b for update in batches for b in update):
                            batch["ref_log_probs"] = self._log_probs(batch)
                times["reference"] = clock.lap()
            sums = torch.zeros(len(REPORT_SUMS) + len(FIRST_UPDATE_SUMS) + 1, dtype=torch.float64)
            every = len(REPORT_SUMS)
            grad_norms = []
            live = torch.tensor([float(rollout.in_loss.sum())], dtype=torch.float64)
            dist.all_reduce(live, group=parallel_state.get_data_parallel_group())
            if live.item() == 0:  # dynamic sampling left every group out: nothing to learn from this rollout
                model.scheduler.step(increment=len(batches))
                batches = []
            for number, update in enumerate(batches):
                result = train_step(model.ddp_chunks, model.optimizer, iter(update), len(update),
                                    update[0]["tokens"].shape[1], self.config.micro_batch_size,
                                    forward_step=self._forward_step())
                model.scheduler.step(increment=1)
                grad_norms.append(result["grad_norm"])
                for report in result["reports"]:
                    values = report["grpo"].double().cpu()
                    sums[:every] += values[:every]
                    if number == 0:  # before this step's first update the weights are the rollout's
                        sums[every:-1] += values[every:-1]
                        sums[-1] = max(sums[-1], values[-1])
        times["update"] = clock.lap()
        return self._metrics(rollout, sums, grad_norms, times)

    def _metrics(self, rollout: Rollout, sums: torch.Tensor, grad_norms: list, times: dict) -> dict:
        """Over every data-parallel rank: rewards, lengths, loss parts, times."""
        lengths = torch.tensor([len(r) for r in rollout.responses], dtype=torch.float64)
        group = parallel_state.get_data_parallel_group()
        rewards = rollout.rewards.double()
        binary = bool(((rewards == 0) | (rewards == 1)).all())
        totals = torch.cat([sums[:-1], torch.tensor([
            rewards.sum().item(), rewards.square().sum().item(), lengths.sum().item(), float(len(lengths)),
            float(sum(rollout.truncated)), float(not binary), (rewards == 1).sum().item()], dtype=torch.float64)])
        peaks = torch.stack([sums[-1], lengths.max()])
        dist.all_reduce(totals, group=group)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
        named = REPORT_SUMS + FIRST_UPDATE_SUMS
        parts = dict(zip(named, totals[:len(named)].tolist()))
        reward_sum, reward_squares, length_sum, count, truncated, not_binary, correct = totals[len(named):].tolist()
        mean = reward_sum / count
        tokens, responses = max(parts["tokens"], 1.0), max(parts["response_tokens"], 1.0)
        values = {
            "loss": parts["loss"] / max(parts["loss_norm"], 1.0), "reward_mean": mean,
            "reward_std": math.sqrt(max(reward_squares / count - mean * mean, 0.0)),
            "accuracy": None if not_binary else correct / count,
            "response_length_mean": length_sum / count, "response_length_max": peaks[1].item(),
            "truncated_share": truncated / count, "kl": parts["kl"] / tokens, "entropy": parts["entropy"] / tokens,
            "clip_fraction": parts["clipped"] / tokens, "max_ratio_drift": peaks[0].item(),
            "rollout_kl": parts["rollout_kl"] / responses, "rollout_beyond_cap": parts["beyond_cap"] / responses,
            "mis_dropped": parts["mis_dropped"] / responses,
            # None without routes, or when dynamic sampling left the whole step out (nothing was compared)
            "routing_mismatch": parts["routing_differ"] / parts["routing_compared"]
            if self.records_routing and parts["routing_compared"] else None,
            "routing_replayed": self.replay is not None,
            "grad_norm": float(grad_norms[-1]) if grad_norms and grad_norms[-1] is not None else None,
            "lr": self.model.optimizer.param_groups[0]["lr"],
            **{f"seconds_{name}": value for name, value in times.items()},
            "generated_tokens_per_second": length_sum / max(times["rollout"], 1e-9),
            "memory_peak_gib": memory_peak_gib(),
        }
        tools = _extra_means(rollout.tool_stats, group, prefix="") if rollout.tool_stats is not None else {}
        return values | _extra_means(rollout.reward_extras, group) | tools

    def validate(self) -> float:
        """Greedy accuracy (mean reward) on the validation prompts, shared out over data-parallel ranks."""
        rank, size = _dp()
        mine = self.valid_prompts[rank::size]
        greedy = Sampling(max_new_tokens=self.settings.max_response_length, temperature=0,
                          stop_token_ids=self.stop_ids)
        with synchronized_parameters(self.model.ddp_chunks):
            # Every rank generates (expert ranks exchange tokens); one without prompts repeats the first.
            tokens = [list(p.tokens) for p in (mine or self.valid_prompts[:1])]
            completions = generate(self._policy(), tokens, greedy, self.model.arch.vocab_size,
                                   slots=self.settings.rollout_batch)
        total = 0.0
        for prompt, completion in zip(mine, completions):
            text = self.model.tokenizer.backend.decode(
                completion.tokens[:-1] if completion.stopped else completion.tokens, skip_special_tokens=False)
            total += self.reward(prompt.text, text, prompt.label, where=f"{prompt.where} (validation)",
                                 data_source=prompt.data_source, extra_info=prompt.extra_info).value
        sums = torch.tensor([total, float(len(mine))], dtype=torch.float64)
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        return (sums[0] / sums[1]).item()


def _extra_means(extras: list[dict[str, float]], group, prefix: str = "reward_extra/") -> dict[str, float]:
    """``reward_extra/KEY`` (``prefix``): each number's mean over the sequences of every data-parallel rank that
    has it."""
    sums: dict[str, list[float]] = {}
    for entry in extras:
        for key, value in entry.items():
            total = sums.setdefault(key, [0.0, 0.0])
            total[0] += value
            total[1] += 1
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, sums, group=group)
    merged: dict[str, list[float]] = {}
    for part in gathered:
        for key, (value, count) in part.items():
            total = merged.setdefault(key, [0.0, 0.0])
            total[0] += value
            total[1] += count
    return {f"{prefix}{key}": value / count for key, (value, count) in sorted(merged.items())}


def _is_logging_rank() -> bool:
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0


def _line(step: int, total: int, values: dict) -> str:
    accuracy = "" if values["accuracy"] is None else f" | accuracy {values['accuracy']:.3f}"
    routing = "" if values["routing_mismatch"] is None else \
        f" | routing mismatch {values['routing_mismatch']:.4f}{' (replayed)' * values['routing_replayed']}"
    return (f"step {step:5d}/{total} | reward {values['reward_mean']:.4f} ± {values['reward_std']:.4f}{accuracy} | "
            f"response {values['response_length_mean']:.1f} tokens (max {values['response_length_max']:.0f}, "
            f"{values['truncated_share']:.0%} truncated) | loss {values['loss']:.5f} | kl {values['kl']:.5f} | "
            f"entropy {values['entropy']:.3f} | clipped {values['clip_fraction']:.3f} | "
            f"max |ratio-1| {values['max_ratio_drift']:.2e} | rollout kl {values['rollout_kl']:.2e}{routing} | "
            f"{values['generated_tokens_per_second']:.0f} "
            f"generated tokens/s")


def train_grpo(config: TrainConfig, settings: GrpoSettings,
               prompts: tuple[list[Prompt], list[Prompt]] | None = None) -> int:
    """Run GRPO in this process (one rank of the job); returns the last step."""
    trainer = GrpoTrainer(config, settings, prompts)
    try:
        return _train(trainer)
    finally:
        trainer.close()


def _train(trainer: GrpoTrainer) -> int:
    config, settings, model = trainer.config, trainer.settings, trainer.model
    writer = MetricsWriter(config.log_dir, config.tensorboard_dir, enabled=_is_logging_rank())
    step = trainer.loaded.iteration
    finish_outputs(model, step)
    while step < config.train_iters:
        values = trainer.step(step)
        step += 1
        writer.write(step, values, line=_line(step, config.train_iters, values))
        if config.eval_interval and trainer.valid_prompts and step % config.eval_interval == 0:
            accuracy = trainer.validate()
            writer.write(step, {"valid_reward": accuracy}, line=f"validation at step {step} | reward {accuracy:.4f}")
        last = step == config.train_iters
        stop = config.exit_interval is not None and step % config.exit_interval == 0
        if config.save and (last or stop or (config.save_interval and step % config.save_interval == 0)):
            save_model(model, step, step * config.global_batch_size, {"grpo": settings.to_dict()}, final=last)
        if stop and not last:
            break
    writer.close()
    return step
