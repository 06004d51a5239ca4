"""GRPO settings, beside the training ones: ``python -m megatron_patch.rl`` takes both as flags or YAML.

The training settings (``TrainConfig``) keep their flags with these meanings in RL:
``--global-batch-size`` prompts per step (each sampled ``--samples-per-prompt`` times),
``--micro-batch-size`` sequences per micro-batch of the log-prob and update passes,
``--seq-length`` at least the longest prompt + response, ``--train-iters`` RL steps,
``--data-path`` / ``--valid-data-path`` prompt JSONL files, ``--load`` the initial policy (and the
reference), ``--eval-interval`` steps between validations (greedy accuracy on the validation prompts).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_patch.errors import InputError
from megatron_patch.outputs import check_writable
from megatron_patch.rl.objectives import ADVANTAGE_ESTIMATORS, AGGREGATIONS, KL_ESTIMATORS, MIS_LEVELS, POLICY_LOSSES
from megatron_patch.rl.prompts import PromptKeys
from megatron_patch.rl.reward_worker import DEFAULT_REWARD_TIMEOUT, check_reward
from megatron_patch.rl.rewards import RewardError
from megatron_patch.rl.tools import DEFAULT_TOOL_TIMEOUT
from megatron_patch.rl.vllm_engine import DEFAULT_ENGINE_TIMEOUT, vllm_python
from megatron_patch.training.config import TrainConfig, TrainConfigError, option
from megatron_patch.training.memory_plan import RolloutShape

ROLLOUT_ENGINES = ("megatron", "vllm")


@dataclass
class GrpoSettings:
    samples_per_prompt: int = option(8, "responses sampled per prompt; the group's rewards give the advantages",
                                     env="MP_GRPO_N")
    max_prompt_length: int = option(512, "prompts longer than this (in tokens, chat template included) are an "
                                         "error", env="MP_GRPO_MAX_PROMPT_LENGTH")
    max_response_length: int = option(512, "tokens generated per response at most",
                                      env="MP_GRPO_MAX_RESPONSE_LENGTH")
    temperature: float = option(1.0, "sampling temperature; log-probs are of the logits / temperature, as verl's",
                                env="MP_GRPO_TEMPERATURE")
    top_p: float = option(1.0, "nucleus sampling; 1 is off", env="MP_GRPO_TOP_P")
    top_k: int = option(0, "sample among the k likeliest tokens; 0 is off", env="MP_GRPO_TOP_K")
    reward: str = option("gsm8k", "gsm8k, gsm8k-flexible, letters or custom:PATH.py:FUNCTION, called as "
                                  "FUNCTION(prompt, response, label) or, with verl's signature, as "
                                  "compute_score(data_source, solution_str, ground_truth, extra_info); a float, or a "
                                  "dict with score (its other numbers logged)", env="MP_GRPO_REWARD")
    reward_timeout: float = option(DEFAULT_REWARD_TIMEOUT, "seconds one call of a custom: reward may take; past them "
                                                           "its process is killed and the job stops naming the sample",
                                   env="MP_GRPO_REWARD_TIMEOUT")
    reward_workers: int = option(1, "processes a custom: reward runs in per rank: each finished response is scored "
                                    "while the others still generate, by the least busy one",
                                 env="MP_GRPO_REWARD_WORKERS")
    rollout_log: str | None = option(None, "write each step's trajectories here, DIR/step_NNNNNN.jsonl: prompt, "
                                           "messages, tokens, loss mask, rollout log-probs, reward, policy version "
                                           "(docs/rl.md)", env="MP_GRPO_ROLLOUT_LOG")
    tools: str | None = option(None, "multi-turn tool calling: PATH.py:fn1,fn2, plain functions with type hints and "
                                     "Google-style docstrings; prompts offer their schemas, each turn's <tool_call>s "
                                     "are run and their results inserted (docs/rl.md)", env="MP_GRPO_TOOLS")
    tool_timeout: float = option(DEFAULT_TOOL_TIMEOUT, "seconds a tool call may take; past them it is an error text "
                                                       "in the tool turn", env="MP_GRPO_TOOL_TIMEOUT")
    max_turns: int = option(5, "with --tools: assistant turns per trajectory at most", env="MP_GRPO_MAX_TURNS")
    advantage_estimator: str = option("grpo", "grpo (group z-score), drgrpo (no std division) or rloo",
                                      env="MP_GRPO_ADVANTAGE", choices=ADVANTAGE_ESTIMATORS)
    policy_loss: str = option("ppo-clip", "ppo-clip (PPO's token ratio, clipped), gspo (the response's ratio, "
                                          "Qwen3-MoE's), cispo (clipped, stop-gradient weight on log pi), gmpo "
                                          "(geometric-mean ratio) or sapo (soft gate); docs/rl.md says which to use",
                              env="MP_GRPO_POLICY_LOSS", choices=tuple(POLICY_LOSSES))
    clip_low: float | None = option(None, "clip below: ratio >= 1 - clip-low (gmpo: log-ratio >= -clip-low; sapo: "
                                          "the temperature of positive advantages); default the loss's own: "
                                          "ppo-clip 0.2, gspo 3e-4, cispo 1, gmpo 0.4, sapo 1",
                                    env="MP_GRPO_CLIP_LOW")
    clip_high: float | None = option(None, "clip above: ratio <= 1 + clip-high (DAPO uses 0.28 with ppo-clip; gmpo: "
                                           "log-ratio <= clip-high; sapo: the temperature of negative advantages); "
                                           "default ppo-clip 0.2, gspo 4e-4, cispo 4, gmpo 0.4, sapo 1.05",
                                     env="MP_GRPO_CLIP_HIGH")
    dual_clip: float | None = option(3.0, "ppo-clip: bound of a negative advantage's loss, -A * c (c > 1)",
                                     env="MP_GRPO_DUAL_CLIP")
    kl_coef: float = option(0.001, "weight of the KL to the reference policy in the loss; 0 skips the reference "
                                   "pass", env="MP_GRPO_KL_COEF")
    kl_estimator: str = option("k3", "k1, k2 or k3 (low-variance)", env="MP_GRPO_KL_ESTIMATOR",
                               choices=KL_ESTIMATORS)
    loss_aggregation: str | None = option(None, "how token losses form the step's loss; default the policy loss's "
                                                "own: token-mean (ppo-clip, cispo), seq-mean-token-mean (gspo, gmpo, "
                                                "sapo)", env="MP_GRPO_LOSS_AGG", choices=AGGREGATIONS)
    updates_per_rollout: int = option(1, "optimizer steps per rollout, each on its share of the sequences; above "
                                         "1 the pre-update log-probs are computed", env="MP_GRPO_UPDATES")
    dynamic_sampling: bool = option(False, "leave groups whose rewards are all equal out of the loss (DAPO; no "
                                           "refill)", env="MP_GRPO_DYNAMIC_SAMPLING")
    overlong_buffer: int = option(0, "DAPO's soft overlong penalty: over the last N tokens before the maximum "
                                     "response length the reward falls linearly", env="MP_GRPO_OVERLONG_BUFFER")
    overlong_penalty: float = option(1.0, "the penalty at the maximum response length",
                                     env="MP_GRPO_OVERLONG_PENALTY")
    enable_thinking: bool = option(True, "Qwen3's thinking mode in the chat template; false adds the empty think "
                                         "block", env="MP_GRPO_THINKING")
    log_prob_chunk: int = option(1024, "tokens per chunk of the fp32 log-prob/entropy computation",
                                 env="MP_GRPO_LOG_PROB_CHUNK")
    input_key: str = option("prompt", "the prompt's key in each record: a string or a chat message list (slime's "
                                      "--input-key; verl's files use prompt)", env="MP_GRPO_INPUT_KEY")
    label_key: str = option("label", "the answer's key (slime's --label-key); without it, verl's "
                                     "reward_model.ground_truth", env="MP_GRPO_LABEL_KEY")
    metadata_key: str = option("extra_info", "the key handed to the reward as extra_info (slime: metadata)",
                               env="MP_GRPO_METADATA_KEY")
    skip_bad_lines: bool = option(False, "count and skip prompt records without a usable prompt or label instead of "
                                         "stopping", env="MP_GRPO_SKIP_BAD_LINES")
    rollout_engine: str = option("megatron", "what generates the rollouts: megatron (the training model itself with "
                                             "Megatron-Core's KV cache: exact, runs everywhere) or vllm (a vLLM "
                                             "engine in its own environment, make setup-vllm; the weights are synced "
                                             "into it before every rollout)", env="MP_GRPO_ROLLOUT",
                                 choices=ROLLOUT_ENGINES)
    vllm_python: str | None = option(None, "the interpreter of vLLM's environment (default: .venv-vllm/bin/python "
                                           "in the repository)", env="MP_GRPO_VLLM_PYTHON")
    vllm_memory_fraction: float = option(0.5, "vLLM on a GPU: the share of its memory vLLM may take (weights and KV "
                                              "cache)", env="MP_GRPO_VLLM_MEMORY_FRACTION")
    vllm_kv_cache_gib: float = option(1.0, "vLLM on CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, whole GiB)",
                                      env="MP_GRPO_VLLM_KV_CACHE_GIB")
    vllm_max_num_seqs: int = option(256, "vLLM: sequences it batches at once at most",
                                    env="MP_GRPO_VLLM_MAX_NUM_SEQS")
    vllm_tensor_parallel_size: int = option(1, "vLLM: its own tensor parallelism (GPUs per engine)",
                                            env="MP_GRPO_VLLM_TP")
    vllm_sleep: bool = option(False, "vLLM colocated with training on the same GPU: it sleeps between rollouts "
                                     "(weights and KV cache released, vLLM's sleep mode) and wakes for the sync and "
                                     "the rollout (GPU only)", env="MP_GRPO_VLLM_SLEEP")
    rollout_gpus: int = option(0, "vLLM disaggregated: the engine runs on this many GPUs of its own, the ones after "
                                  "the trainer's on this node, as its tensor parallelism; 0 shares the trainer's "
                                  "(GPU only)", env="MP_GRPO_ROLLOUT_GPUS")
    vllm_sync_bucket_mb: int = option(1024, "vLLM weight sync: MB of weights rank 0 gathers and hands over at a time "
                                            "(a larger tensor goes alone); bounds rank 0's host memory and the "
                                            "shared-memory file", env="MP_GRPO_VLLM_SYNC_BUCKET_MB")
    engine_timeout: float = option(DEFAULT_ENGINE_TIMEOUT, "seconds the vLLM engine may go without answering and "
                                                           "without using any CPU (stopped, deadlocked); then the "
                                                           "job stops naming its pid and what it was asked",
                                   env="MP_GRPO_ENGINE_TIMEOUT")
    vllm_enforce_eager: bool = option(True, "vLLM: no CUDA graphs or torch.compile (faster start; off for speed on "
                                            "a GPU)", env="MP_GRPO_VLLM_ENFORCE_EAGER")
    tis: bool = option(False, "truncated importance sampling: weight each response token's loss by "
                              "min(exp(logp_old - logp_rollout), --tis-cap), for a rollout engine whose log-probs are "
                              "not the training forward's (vLLM)", env="MP_GRPO_TIS")
    tis_cap: float = option(2.0, "the cap C of --tis; also the bound of the rollout_beyond_cap metric (ratios above C "
                                 "or below 1/C)", env="MP_GRPO_TIS_CAP")
    mis: bool = option(False, "masked importance sampling: response tokens whose ratio exp(logp_old - logp_rollout) "
                              "leaves [--mis-low, --mis-high] drop out of the loss", env="MP_GRPO_MIS")
    mis_level: str = option("token", "token: each token on its own ratio; sequence: a whole response drops out when "
                                     "its geometric-mean ratio leaves the bounds", env="MP_GRPO_MIS_LEVEL",
                            choices=MIS_LEVELS)
    mis_low: float = option(0.5, "lower bound of --mis", env="MP_GRPO_MIS_LOW")
    mis_high: float = option(2.0, "upper bound of --mis", env="MP_GRPO_MIS_HIGH")
    routing_replay: bool = option(False, "routing replay (R3) for MoE: the log-prob, reference and update forwards "
                                         "(and their recompute) use the experts each token took in the rollout; the "
                                         "router is still computed and trained. Needs --tensor-model-parallel-size 1",
                                  env="MP_GRPO_ROUTING_REPLAY")
    rollout_batch: int = option(0, "sequences a rank generates at once (0: its whole share of the step); when one "
                                   "ends, the next takes its slot (continuous batching). Bounds the rollout's KV cache "
                                   "and prefill (python -m megatron_patch.plan shows them)",
                                env="MP_GRPO_ROLLOUT_BATCH")

    def check(self, config: TrainConfig, data_parallel_size: int) -> None:
        """Raise TrainConfigError naming the setting (``config`` gives the batch, sequence and layout)."""
        def fail(message):
            raise TrainConfigError(message)

        for name in ("samples_per_prompt", "max_prompt_length", "max_response_length", "updates_per_rollout",
                     "log_prob_chunk", "reward_workers", "max_turns"):
            if getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length + self.max_response_length > config.seq_length:
            fail(f"--seq-length {config.seq_length} is below --max-prompt-length {self.max_prompt_length} + "
                 f"--max-response-length {self.max_response_length}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            fail(f"sampling: --temperature {self.temperature} (>= 0), --top-p {self.top_p} (in (0, 1]), "
                 f"--top-k {self.top_k} (>= 0)")
        low, high = self.clips
        if self.policy_loss == "sapo":
            if low <= 0 or high <= 0:
                fail(f"--clip-low {low} and --clip-high {high} are sapo's temperatures: both must be > 0")
        elif not 0 <= low <= (1 if self.policy_loss == "cispo" else math.inf) or high < 0 or \
                (self.policy_loss in ("ppo-clip", "gspo") and low >= 1):
            fail(f"--clip-low {low} must be in [0, 1) ({self.policy_loss}; cispo allows 1: no lower bound) and "
                 f"--clip-high {high} >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            fail(f"--dual-clip {self.dual_clip} must be > 1")
        if self.rollout_batch < 0:
            fail(f"--rollout-batch must be >= 0, got {self.rollout_batch}")
        if self.tis_cap <= 1:
            fail(f"--tis-cap {self.tis_cap} must be > 1")
        if not 0 < self.mis_low <= 1 <= self.mis_high:
            fail(f"--mis-low {self.mis_low} and --mis-high {self.mis_high} must hold 1, with --mis-low > 0")
        if self.routing_replay and config.tensor_model_parallel_size > 1:
            fail("--routing-replay needs --tensor-model-parallel-size 1: sequence parallelism splits a router's tokens "
                 "over tensor-parallel ranks (expert parallelism is fine)")
        if self.rollout_engine == "vllm":
            if self.vllm_sleep and self.rollout_gpus:
                fail("--vllm-sleep (colocated) and --rollout-gpus (disaggregated) exclude each other")
        elif self.vllm_sleep or self.rollout_gpus:
            fail("--vllm-sleep and --rollout-gpus are for --rollout-engine vllm")
        if self.vllm_sync_bucket_mb < 1:
            fail(f"--vllm-sync-bucket-mb must be >= 1, got {self.vllm_sync_bucket_mb}")
        if self.rollout_gpus < 0:
            fail(f"--rollout-gpus must be >= 0, got {self.rollout_gpus}")
        if self.kl_coef < 0:
            fail(f"--kl-coef {self.kl_coef} must be >= 0")
        if not 0 <= self.overlong_buffer < self.max_response_length:
            fail(f"--overlong-buffer {self.overlong_buffer} must be in [0, --max-response-length "
                 f"{self.max_response_length})")
        if config.global_batch_size % data_parallel_size:
            fail(f"--global-batch-size {config.global_batch_size} (prompts per step) is not a multiple of the "
                 f"data-parallel size {data_parallel_size}")
        local = self.sequences_per_update(config, data_parallel_size)
        if local is None:
            fail(f"--global-batch-size {config.global_batch_size} x --samples-per-prompt {self.samples_per_prompt} "
                 f"sequences over {data_parallel_size} data-parallel rank(s) and --updates-per-rollout "
                 f"{self.updates_per_rollout} do not split into whole micro-batches of --micro-batch-size "
                 f"{config.micro_batch_size}")
        if config.pipeline_model_parallel_size > 1 or config.context_parallel_size > 1:
            fail("GRPO needs --pipeline-model-parallel-size 1 and --context-parallel-size 1: the rollout generates "
                 "with the whole model on each rank (use tensor and expert parallelism)")
        for name in ("reward_timeout", "engine_timeout", "tool_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                fail(f"--{name.replace('_', '-')} must be a positive number of seconds, got {getattr(self, name)}")
        if self.rollout_log:
            try:
                check_writable(self.rollout_log, "--rollout-log")
            except InputError as err:
                fail(str(err))
        if self.rollout_engine == "vllm":  # last: the settings' own errors come first
            try:
                vllm_python(self.vllm_python)
            except InputError as err:
                fail(str(err))
        try:
            check_reward(self.reward, self.reward_timeout)
        except RewardError as err:
            fail(str(err))

    @property
    def clips(self) -> tuple[float, float]:
        """(clip_low, clip_high) as given, else the policy loss's own."""
        defaults = POLICY_LOSSES[self.policy_loss][1]
        return (defaults[0] if self.clip_low is None else self.clip_low,
                defaults[1] if self.clip_high is None else self.clip_high)

    @property
    def aggregation(self) -> str:
        """--loss-aggregation as given, else the policy loss's own."""
        return self.loss_aggregation or POLICY_LOSSES[self.policy_loss][2]

    def prompt_keys(self) -> PromptKeys:
        return PromptKeys(self.input_key, self.label_key, self.metadata_key)

    def sequences_per_update(self, config: TrainConfig, data_parallel_size: int) -> int | None:
        """Sequences of one optimizer step on one data-parallel rank (None when they do not divide)."""
        local = config.global_batch_size * self.samples_per_prompt
        if local % (data_parallel_size * self.updates_per_rollout):
            return None
        per_update = local // data_parallel_size // self.updates_per_rollout
        return per_update if per_update % config.micro_batch_size == 0 else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def data_parallel_size(config: TrainConfig, world_size: int) -> int:
    return max(world_size // config.tensor_model_parallel_size, 1)


def rollout_shape(config: TrainConfig, settings: GrpoSettings, world_size: int) -> RolloutShape:
    """What one data-parallel rank's rollout holds at once: its share of a step's sequences, or
    --rollout-batch of them."""
    dp = data_parallel_size(config, world_size)
    share = config.global_batch_size // dp * settings.samples_per_prompt
    return RolloutShape(sequences=min(settings.rollout_batch or share, share),
                        refills=0 < settings.rollout_batch < share,
                        prompt_tokens=settings.max_prompt_length, response_tokens=settings.max_response_length,
                        log_prob_chunk=settings.log_prob_chunk,
                        reference_on_host=settings.kl_coef > 0 and not config.lora_rank)


def training_view(config: TrainConfig, settings: GrpoSettings, world_size: int) -> TrainConfig:
    """The settings the model, optimizer and their checks see: an optimizer step trains on this many
    sequences (not prompts), the data are JSONL files, and validation is GRPO's own."""
    dp = data_parallel_size(config, world_size)
    per_update = settings.sequences_per_update(config, dp) or config.micro_batch_size
    return dataclasses.replace(config, global_batch_size=per_update * dp, dataset_type="raw", train_mode="finetune",
                               eval_interval=None)
