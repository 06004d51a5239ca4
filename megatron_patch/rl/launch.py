"""run_mcore_qwen3_grpo.sh: the 27 arguments of run_mcore_qwen3.sh, read by the same code, with RL
meanings, and MP_GRPO_* variables -> a torchrun of ``python -m megatron_patch.rl``.

  GLOBAL_BATCH_SIZE        prompts per step (each sampled MP_GRPO_N times)
  BATCH_SIZE               sequences per micro-batch of the log-prob and update passes
  SEQ_LEN                  >= MP_GRPO_MAX_PROMPT_LENGTH + MP_GRPO_MAX_RESPONSE_LENGTH
  TRAIN_TOKENS_OR_ITERS    RL steps (whatever SFT says); WARMUP_TOKENS_OR_ITERS: warmup steps
  DATASET_PATH             prompt JSONL file(s); VALID_DATASET_PATH: validation prompts or none
  PRETRAIN_CHECKPOINT_PATH the initial policy and the reference

Every GRPO setting of ``python -m megatron_patch.rl --help`` that names a variable is set by it
(MP_GRPO_N, MP_GRPO_REWARD, MP_GRPO_KL_COEF ...); MP_GRPO_EVAL_INTERVAL is the validation
interval (default 10 when VALID_DATASET_PATH is given). MP_LORA_* gives LoRA GRPO.
"""

from __future__ import annotations

import dataclasses
import sys

from megatron_patch.rl.__main__ import parse_rl_config, read_run_prompts
from megatron_patch.rl.config import GrpoSettings, rollout_shape, training_view
from megatron_patch.training.launch import POSITIONALS, Job, LaunchError, main
from megatron_patch.training.memory_plan import MemoryPlan, plan_memory
from megatron_patch.training.preflight import check_inputs as check_training_inputs
from megatron_patch.training.preflight import check_run, resolve_model, resolved_transformer_impl

USAGE = "usage: run_mcore_qwen3_grpo.sh " + " ".join(POSITIONALS)


def _variables() -> dict[str, dataclasses.Field]:
    return {f.metadata["env"]: f for f in dataclasses.fields(GrpoSettings) if f.metadata.get("env")}


def _flag(spec: dataclasses.Field) -> str:
    return "--" + spec.name.replace("_", "-")


def grpo_flags(env: dict) -> list:
    """The GRPO flags the MP_GRPO_* variables set (true/false for switches)."""
    flags = []
    for name, spec in _variables().items():
        value = env.get(name)
        if not value:
            continue
        if isinstance(spec.default, bool):
            if value.lower() not in ("true", "false"):
                raise LaunchError(f"{name} must be true or false, got {value!r}")
            flags.append(_flag(spec) if value.lower() == "true" else "--no-" + _flag(spec)[2:])
        else:
            flags += [_flag(spec), value]
    return flags


def prompt_flags(values: dict, env: dict, pad: int) -> list:
    flags = ["--data-path", *values["DATASET_PATH"].split()]
    if values["VALID_DATASET_PATH"] != "none":
        flags += ["--valid-data-path", *values["VALID_DATASET_PATH"].split(),
                  "--eval-interval", env.get("MP_GRPO_EVAL_INTERVAL") or 10]
    return flags


def _grpo_run(flags: list[str], world_size: int):
    """(the flags' settings, GRPO's settings, the settings the model sees, its architecture, its transformer
    implementation); GRPO's own checks run on the way."""
    config, settings, _ = parse_rl_config(flags, world_size)
    view = training_view(config, settings, world_size)
    arch, _ = resolve_model(view.model)
    return config, settings, view, arch, resolved_transformer_impl(view)


def check(flags: list[str], world_size: int) -> None:
    """GRPO's checks and the trainer's, on the settings the model will see."""
    _, _, view, arch, impl = _grpo_run(flags, world_size)
    check_run(view, arch, impl, world_size)


def memory(flags: list[str], world_size: int) -> MemoryPlan:
    """The planned per-GPU memory: the update's, or the rollout's when it needs more."""
    config, settings, view, arch, impl = _grpo_run(flags, world_size)
    return plan_memory(view, arch, impl, world_size, rollout_shape(config, settings, world_size))


def check_inputs(flags: list[str]) -> None:
    """The prompt files read whole (each bad line named) and the checkpoint to start from present."""
    config, settings, _ = parse_rl_config(flags)
    read_run_prompts(config, settings)
    check_training_inputs(training_view(config, settings, 1))


GRPO = Job(module="megatron_patch.rl", label="grpo", steps=True, data_flags=prompt_flags, extra_flags=grpo_flags,
           check=check, check_inputs=check_inputs, memory=memory, usage=USAGE,
           flag_sources={_flag(spec): name for name, spec in _variables().items()}
           | {"--eval-interval": "MP_GRPO_EVAL_INTERVAL"})


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], job=GRPO))
