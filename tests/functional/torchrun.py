"""Start real multi-process runs with torchrun (gloo on CPU)."""

import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).parent / "workers" / "parallel_worker.py"
REPO = Path(__file__).resolve().parents[2]


def _run(command, timeout):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command[:8])}... failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def torchrun(nproc: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """The test worker (tests/functional/workers/parallel_worker.py) on ``nproc`` processes."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 str(WORKER), *map(str, args)], timeout)


def torchrun_module(nproc: int, module: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m module`` on ``nproc`` processes."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 "-m", module, *map(str, args)], timeout)
