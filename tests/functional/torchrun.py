"""Start real multi-process runs with torchrun (gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def threads_per_process(nproc: int) -> int:
    """The machine's cores shared out: a 1-process job on 2 cores computes twice as fast with both."""
    return max(1, (os.cpu_count() or 1) // nproc)


def _run(command, timeout, nproc: int = 1, env: dict | None = None):
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(threads_per_process(nproc)), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command[:8])}... failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def torchrun_module(nproc: int, module: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m module`` on ``nproc`` processes."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 "-m", module, *map(str, args)], timeout, nproc)


BATCH = Path(__file__).parent / "workers" / "batch.py"


def torchrun_batch(nproc: int, jobs: dict[str, tuple[str, list]], folder: Path, timeout: int = 900,
                   env: dict | None = None) -> dict[str, str]:
    """Several jobs in one launch (workers/batch.py), in order: {name: (kind, argv)} -> {name: rank 0's output}.

    kind is "train" (the real trainer on these flags), "eval" (python -m megatron_patch.evaluation)
    or "check" (a parallel_worker.py mode).
    """
    folder.mkdir(parents=True, exist_ok=True)
    listing = [{"kind": kind, "argv": [str(a) for a in argv], "stdout": str(folder / f"{name}.out")}
               for name, (kind, argv) in jobs.items()]
    (folder / "jobs.json").write_text(json.dumps(listing, indent=1))
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
          str(BATCH), str(folder / "jobs.json")], timeout, nproc, env)
    return {name: (folder / f"{name}.out").read_text() for name in jobs}
