"""A conversion killed mid-way leaves nothing that looks like a checkpoint, and the next run succeeds."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
from tests.conftest import TINY_MOE

# Big enough (about 60 MB in fp32) that writing takes a while after the staging directory appears.
MEDIUM_MOE = TINY_MOE.replace(hidden_size=256, ffn_hidden_size=512, moe_ffn_hidden_size=256, num_experts=16,
                              vocab_size=4096, num_attention_heads=8, num_query_groups=2, head_dim=64)


@pytest.mark.slow
def test_killed_conversion_leaves_no_checkpoint(tmp_path):
    save_random_hf_checkpoint(MEDIUM_MOE, tmp_path / "hf")
    save_dir = tmp_path / "mcore"
    command = [sys.executable, "-m", "megatron_patch.convert", "--load-dir", str(tmp_path / "hf"),
               "--save-dir", str(save_dir), "--precision", "fp32"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f".mcore.incomplete.{process.pid}"  # each writer stages under its own name
    deadline = time.monotonic() + 120
    while not staging.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the conversion ended before it could be interrupted"
    assert staging.exists() and not save_dir.exists()
    assert not (staging / "latest_checkpointed_iteration.txt").exists()

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.glob(".mcore.incomplete*"))  # the killed run's staging removed by the next
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "release"
