"""Every layout the launcher would accept for a model on a cluster, planned and ranked.

A candidate is a full ``TrainConfig`` (and GRPO's settings); it is kept when the trainer's own
checks accept it (``TrainConfig.check``, ``layout_problems``, ``GrpoSettings.check``: the checks the
launcher runs), then planned for memory (training/memory_plan.py) and speed (plan/speed.py). The
ranking: layouts that fit first, then estimated tokens per second, then the smaller peak.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field

from megatron_patch.errors import InputError
from megatron_patch.models.layout_check import layout_problems
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.plan.cluster import Cluster
from megatron_patch.plan.speed import StepTime, step_time
from megatron_patch.rl.config import GrpoSettings, data_parallel_size, rollout_shape, training_view
from megatron_patch.training.config import TrainConfig
from megatron_patch.training.memory_plan import MemoryPlan, plan_memory

MODES = ("pretrain", "sft", "lora", "grpo")
# The settings a user may fix (the rest are searched); their launcher names.
LAYOUT_SETTINGS = {
    "tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size", "cp": "context_parallel_size",
    "ep": "expert_model_parallel_size", "etp": "expert_tensor_parallel_size", "sp": "sequence_parallel",
    "vp": "num_layers_per_virtual_pipeline_stage", "ac": "recompute", "do": "use_distributed_optimizer",
    "optimizer_offload": "optimizer_offload_fraction", "micro_batch_size": "micro_batch_size",
}


# Searched values that depend on TP: ETP equal to it, and SP on exactly when TP > 1 (MoE with TP needs it;
# a dense model keeps less with it).
SAME_AS_TP, ON_WITH_TP = "same as TP", "on with TP"


class PlanError(InputError):
    """A request no layout can satisfy, or a bad setting; the message names it."""


@dataclass(frozen=True)
class Request:
    model: str
    arch: Qwen3Arch
    cluster: Cluster
    seq_length: int
    global_batch_size: int
    mode: str = "sft"
    precision: str = "bf16"
    impl: str = "torch"
    lora_rank: int = 0
    fixed: dict = field(default_factory=dict)  # LAYOUT_SETTINGS keys -> values
    grpo: GrpoSettings | None = None


@dataclass(frozen=True)
class Candidate:
    config: TrainConfig  # as the launcher's flags give it (GRPO: prompts per step)
    memory: MemoryPlan
    time: StepTime
    fits: bool

    def tokens_per_gpu_second(self, gpus: int) -> float:
        return self.time.tokens_per_gpu_second(gpus)


def _options(request: Request) -> dict[str, list]:
    arch, cluster, impl = request.arch, request.cluster, request.impl
    powers = [2 ** n for n in range(11)]
    grpo = request.mode == "grpo"
    options = {
        "tp": [n for n in powers if n <= cluster.gpus_per_node and n <= cluster.gpus],
        "pp": [1] if grpo else [n for n in range(1, 17) if arch.num_layers % n == 0 and cluster.gpus % n == 0],
        "cp": [n for n in (1, 2, 4) if n == 1 or (impl == "transformer_engine" and not grpo)],
        "ep": [n for n in powers if n <= max(arch.num_experts, 1) and n <= cluster.gpus],
        "etp": [1, SAME_AS_TP] if arch.is_moe else [1],
        "sp": [ON_WITH_TP],
        "vp": [None],
        "ac": ["none", "full"] + (["sel"] if impl == "local" else []),
        "do": [True],
        "optimizer_offload": [None, 1.0],
        "micro_batch_size": [1, 2, 4],
    }
    for name, value in request.fixed.items():
        options[name] = [value]
    return options


def _config(request: Request, choice: dict) -> TrainConfig:
    tp = choice["tp"]
    values = {LAYOUT_SETTINGS[name]: value for name, value in choice.items()}
    values["expert_tensor_parallel_size"] = tp if choice["etp"] == SAME_AS_TP else choice["etp"]
    values["sequence_parallel"] = tp > 1 if choice["sp"] == ON_WITH_TP else choice["sp"]
    return TrainConfig(model=request.model, transformer_impl=request.impl, precision=request.precision,
                       seq_length=request.seq_length, global_batch_size=request.global_batch_size,
                       train_mode="pretrain" if request.mode == "pretrain" else "finetune",
                       lora_rank=request.lora_rank, data_path=["(planned)"], **values)


def _accepted(request: Request, config: TrainConfig) -> str | None:
    """The first reason the launcher would refuse ``config`` (None: accepted)."""
    world = request.cluster.gpus
    try:
        if request.grpo is not None:
            request.grpo.check(config, data_parallel_size(config, world))
            config = training_view(config, request.grpo, world)
        config.check(world)
    except InputError as err:
        return str(err)
    problems = layout_problems(request.arch, config.parallel_layout(request.arch), request.impl,
                               config.run_features(), world)
    return problems[0] if problems else None


def evaluate(request: Request, config: TrainConfig) -> Candidate:
    """Memory and speed of one accepted configuration."""
    cluster, arch, impl = request.cluster, request.arch, request.impl
    rollout = rollout_shape(config, request.grpo, cluster.gpus) if request.grpo is not None else None
    trained = training_view(config, request.grpo, cluster.gpus) if rollout else config
    memory = plan_memory(trained, arch, impl, cluster.gpus, rollout)
    time = step_time(trained, arch, cluster, memory.static, rollout,
                     kl=bool(request.grpo and request.grpo.kl_coef > 0))
    if rollout is not None:  # a GRPO step's tokens: every sequence sampled
        time = dataclasses.replace(time, tokens=config.global_batch_size * request.grpo.samples_per_prompt
                                   * config.seq_length)
    return Candidate(config, memory, time, memory.peak <= cluster.usable_memory)


def search(request: Request) -> tuple[list[Candidate], str | None]:
    """(every accepted configuration, ranked; the first refusal's reason, for when none is accepted)."""
    options = _options(request)
    names = list(options)
    candidates, seen, first_refusal = [], set(), None
    for values in itertools.product(*(options[name] for name in names)):
        config = _config(request, dict(zip(names, values)))
        key = json.dumps(config.to_dict(), sort_keys=True)  # ETP 1 and "same as TP" meet at TP 1
        if key in seen:
            continue
        seen.add(key)
        refusal = _accepted(request, config)
        if refusal is not None:
            first_refusal = first_refusal or refusal
            continue
        candidates.append(evaluate(request, config))
    candidates.sort(key=lambda c: (not c.fits, -c.tokens_per_gpu_second(request.cluster.gpus), c.memory.peak))
    return candidates, first_refusal
