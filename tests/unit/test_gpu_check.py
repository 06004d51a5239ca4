"""benchmarks/gpu_check.py in its dry mode (CPU, tiny shapes): every step runs, so the script is ready
the moment a GPU is lent."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_step_of_the_gpu_check_runs_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=1200)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    failed = {name: entry.get("output_tail", "")[-1500:] for name, entry in steps.items()
              if entry["status"] not in ("ok", "skipped")}
    assert result.returncode == 0 and not failed, (result.stdout, failed)
    assert list(steps) == ["install", "environment", "kernels", "checkpoint", "train", "script_bf16", "script_lora",
                           "eval", "script_grpo"]
    assert steps["install"]["status"] == "skipped"  # the dry mode uses this environment
    assert steps["environment"]["result"]["megatron-core"] == importlib.metadata.version("megatron-core")
    assert steps["checkpoint"]["result"]["verify"].startswith("verify: fp32: max |dlogits| = ")  # else exit 2
    assert steps["train"]["result"]["runs"]["torch"]["tokens_per_s"] > 0
    for name in ("script_bf16", "script_lora"):
        assert steps[name]["result"]["last_loss"] < steps[name]["result"]["first_loss"]
        assert steps[name]["result"]["planned_memory_gib"] > 0  # the launch's dry-run plan was read
    assert steps["script_grpo"]["result"]["steps"] == 1 and steps["script_grpo"]["result"]["seconds_rollout"] > 0
    assert steps["eval"]["result"]["max_loglikelihood_difference"] < 1e-4


@pytest.mark.slow
def test_an_unknown_step_is_named():
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--steps", "kernels,warp"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown step(s) ['warp']" in result.stderr
