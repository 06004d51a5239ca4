"""The Pai-compatible converter script: its arguments match its README, and it runs."""

import re
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_patch.models.hf_checkpoint import HFCheckpoint

TOOLKIT = Path(__file__).resolve().parents[2] / "toolkits" / "distributed_checkpoints_convertor"
SCRIPT = TOOLKIT / "scripts" / "qwen3" / "run_8xH20.sh"


def script_positionals():
    return re.findall(r"^([A-Z][A-Z0-9_]*)=\$\{?(\d)", SCRIPT.read_text(), re.MULTILINE)


def test_script_arguments_match_readme_and_usage():
    positionals = [name for name, _ in script_positionals()]
    assert [int(i) for _, i in script_positionals()] == list(range(1, 8))
    readme_rows = re.findall(r"^\| (\d) \| ([A-Z][A-Z0-9_]*) \|", (TOOLKIT / "README.md").read_text(), re.MULTILINE)
    assert [name for _, name in readme_rows] == positionals
    usage = re.search(r"usage: run_8xH20.sh (.*)", SCRIPT.read_text()).group(1)
    assert usage.replace("[", "").replace("]", "").split() == positionals


def run_script(*args, env=None, cwd=None):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_script_converts_both_ways_from_another_directory(hf_checkpoints, tmp_path):
    _, hf_dir, _ = hf_checkpoints["moe-gqa"]
    (tmp_path / "hf").symlink_to(hf_dir)
    result = run_script("auto", "hf", "mcore", "false", "false", "fp32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("auto", "mcore", "back", "true", "false", "fp32", "hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    source, back = HFCheckpoint(hf_dir), HFCheckpoint(tmp_path / "back")
    assert all(torch.equal(source.get(name), back.get(name)) for name in source.keys())


@pytest.mark.slow
def test_script_rejects_bad_arguments(hf_checkpoints, tmp_path):
    result = run_script("A3B", "x")
    assert result.returncode == 2 and "usage: run_8xH20.sh MODEL_SIZE LOAD_DIR" in result.stderr
    result = run_script("A3B", "x", "y", "maybe", "false", "bf16")
    assert result.returncode == 2 and "MG2HF must be true or false, got 'maybe'" in result.stderr
    _, hf_dir, _ = hf_checkpoints["moe-gqa"]
    import os

    env = {**os.environ, "MODEL_PARALLEL_ARGS": "--expert-model-parallel-size 3"}
    result = run_script("auto", hf_dir, tmp_path / "out", "false", "false", "bf16", env=env)
    assert result.returncode == 2
    expected = "error: MODEL_PARALLEL_ARGS: --expert-model-parallel-size 3 does not divide the 8 experts"
    assert result.stderr.strip().splitlines()[-1] == expected
    assert not (tmp_path / "out").exists()
