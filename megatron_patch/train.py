"""python -m megatron_patch.train: pretrain or fine-tune Qwen3 / Qwen3-MoE on Megatron-Core.

One process per device under torchrun (``examples/qwen3/run_mcore_qwen3.sh`` builds the
command), or a single process on its own. Without a GPU it runs on CPU with gloo, so a recipe
can be smoke-tested anywhere. ``--help`` lists every setting; ``--print-config`` shows the
resolved settings without training.
"""

from __future__ import annotations

import os

import torch.distributed as dist
import yaml

from megatron_patch.errors import exit_on_input_error
from megatron_patch.parallel import die_with_launcher
from megatron_patch.patches.warnings import silence_upstream_warnings
from megatron_patch.training.config import parse_config


def _run(argv) -> None:
    config, print_only = parse_config(argv)
    if print_only:
        config.check()
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print("megatron_patch.train settings:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False), flush=True)
    # Entry point: Megatron-Core (~5 s to import) only after the settings parsed.
    from megatron_patch.training.loop import train

    try:
        result = train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"done: iterations {result.start_iteration}..{result.last_iteration}", flush=True)


def main(argv=None) -> int:
    die_with_launcher()
    silence_upstream_warnings()
    return exit_on_input_error(lambda: _run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
