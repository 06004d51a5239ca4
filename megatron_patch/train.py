"""python -m megatron_patch.train: pretrain or fine-tune Qwen3 / Qwen3-MoE on Megatron-Core.

One process per device under torchrun (``examples/qwen3/run_mcore_qwen3.sh`` builds the
command), or a single process on its own. Without a GPU it runs on CPU with gloo, so a recipe
can be smoke-tested anywhere. ``--help`` lists every setting; ``--print-config`` shows the
resolved settings without training.
"""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    import yaml

    from megatron_patch.training.config import TrainConfigError, parse_config

    try:
        config, print_only = parse_config(argv)
        if print_only:
            config.check()
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
    except TrainConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from megatron_patch.data.records import RecordError
    from megatron_patch.training.checkpointing import CheckpointError
    from megatron_patch.training.data import DataConfigError
    from megatron_patch.training.loop import train

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print("megatron_patch.train settings:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False), flush=True)
    try:
        result = train(config)
    except (TrainConfigError, CheckpointError, DataConfigError, RecordError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"done: iterations {result.start_iteration}..{result.last_iteration}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
