"""Several jobs in one torchrun launch: the process start and imports are paid once, not per job.

  python -m torch.distributed.run --nproc_per_node N tests/functional/workers/batch.py JOBS.json

JOBS.json is a list of {"kind": "train" | "rl" | "eval" | "check" | "memory", "argv": [...], "stdout": PATH}.
"train" runs the real trainer (megatron_patch.training.loop.train on the parsed flags, as
``python -m megatron_patch.train`` does), "rl" GRPO (megatron_patch.rl.loop.train_grpo, as
``python -m megatron_patch.rl`` does), "eval" the evaluation entry point (what run_eval.sh
execs), "check" one mode of workers/parallel_worker.py, "memory" the planned and allocated
static memory of a training run (workers/memory_worker.py). Each
job rebuilds Megatron-Core's process groups for its own layout (initialize_parallel), so jobs
of different layouts follow each other in the same world. Rank 0's output of each job goes to
its "stdout" file; a bad-input error is written there as ``error: ...`` and the batch goes on.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_patch.errors import InputError
from megatron_patch.evaluation.run import main as evaluate
from megatron_patch.patches import silence_upstream_warnings
from megatron_patch.rl.__main__ import parse_rl_config
from megatron_patch.rl.loop import train_grpo
from megatron_patch.training.config import parse_config
from megatron_patch.training.loop import train
from tests.functional.workers.memory_worker import run as run_memory_check
from tests.functional.workers.parallel_worker import run as run_check


def run_job(job: dict) -> None:
    if job["kind"] == "train":
        config, _ = parse_config(job["argv"])
        train(config)
    elif job["kind"] == "rl":
        config, settings, _ = parse_rl_config(job["argv"])
        train_grpo(config, settings)
    elif job["kind"] == "eval":
        if evaluate(job["argv"]) != 0:
            raise InputError(f"evaluation {' '.join(job['argv'][:3])} failed")
    elif job["kind"] == "memory":
        run_memory_check(job["argv"])
    else:
        run_check(job["argv"])


def main() -> None:
    silence_upstream_warnings()
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        rank0 = os.environ.get("RANK", "0") == "0"  # before the first job the process group does not exist
        with open(job["stdout"] if rank0 else "/dev/null", "w") as out, contextlib.redirect_stdout(out):
            try:
                run_job(job)
            except InputError as err:
                print(f"error: {err}", flush=True)
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
