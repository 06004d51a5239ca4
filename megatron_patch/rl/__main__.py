"""python -m megatron_patch.rl: GRPO for Qwen3 / Qwen3-MoE on Megatron-Core (rl/loop.py).

One process per device under torchrun (``examples/qwen3/run_mcore_qwen3_grpo.sh`` builds the
command), or one process on its own; on CPU with gloo without a GPU. The training flags keep
their names with RL meanings (rl/config.py); ``--help`` lists both kinds, ``--print-config``
shows the resolved settings without training. A YAML ``--config`` may hold both.
"""

from __future__ import annotations

import os

import torch.distributed as dist
import yaml

from megatron_patch.data.tokenizer import Qwen3Tokenizer
from megatron_patch.errors import exit_on_input_error
from megatron_patch.parallel import die_with_launcher
from megatron_patch.patches.warnings import silence_upstream_warnings
from megatron_patch.rl.config import GrpoSettings, data_parallel_size
from megatron_patch.rl.prompts import Prompt, read_prompt_files
from megatron_patch.rl.reward_worker import check_reward
from megatron_patch.rl.tools import tool_schemas
from megatron_patch.training.config import TrainConfig, build_parser, parse_settings

DESCRIPTION = ("GRPO reinforcement learning for Qwen3 / Qwen3-MoE on Megatron-Core: sample responses to prompts "
               "with the training model itself, score them, train on the group advantages. --global-batch-size is "
               "prompts per step, --micro-batch-size sequences per micro-batch, --train-iters steps, --data-path "
               "and --valid-data-path prompt JSONL files ({\"prompt\" or \"messages\", \"label\"}). Settings come "
               "from these flags and/or --config FILE.yaml; flags win.")


def parse_rl_config(argv, world_size: int | None = None) -> tuple[TrainConfig, GrpoSettings, bool]:
    """(training settings, GRPO settings, print only), checked for ``world_size`` processes (default
    torchrun's WORLD_SIZE)."""
    parser = build_parser("python -m megatron_patch.rl", DESCRIPTION, (TrainConfig, GrpoSettings))
    (config, settings), print_only = parse_settings(argv, parser, (TrainConfig, GrpoSettings))
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    settings.check(config, data_parallel_size(config, world))
    return config, settings, print_only


def read_run_prompts(config: TrainConfig, settings: GrpoSettings) -> tuple[list[Prompt], list[Prompt]]:
    """The training and validation prompts, tokenized with the run's tokenizer (a bad line is named
    here, before the model is built)."""
    # The pre-flight module imports Megatron-Core (~5 s): not before the arguments have parsed.
    from megatron_patch.training.preflight import resolve_model, resolve_tokenizer_dir

    _, hf_dir = resolve_model(config.model)
    tokenizer = Qwen3Tokenizer.from_dir(resolve_tokenizer_dir(config, hf_dir))
    return read_prompt_files(config, settings, tokenizer, check_reward(settings.reward, settings.reward_timeout),
                             tool_schemas(settings.tools, settings.tool_timeout))


def _run(argv) -> None:
    config, settings, print_only = parse_rl_config(argv)
    resolved = {**config.to_dict(), **settings.to_dict()}
    if print_only:
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print("megatron_patch.rl settings:\n" + yaml.safe_dump(resolved, sort_keys=False), flush=True)
    # Entry point: Megatron-Core (~5 s to import) only after the settings parsed.
    prompts = read_run_prompts(config, settings)
    from megatron_patch.rl.loop import train_grpo

    try:
        train_grpo(config, settings, prompts)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    die_with_launcher()
    silence_upstream_warnings()
    return exit_on_input_error(lambda: _run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
