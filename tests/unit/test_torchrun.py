"""python -m megatron_patch.torchrun: a failed job under torchrun ends in one line, not ChildFailedError."""

import subprocess
import sys

import pytest

from megatron_patch.errors import InputError, report_input_error
from megatron_patch.torchrun import summary


def torchrun(*args, timeout=180):
    command = [sys.executable, "-m", "megatron_patch.torchrun", "--standalone", "--nproc_per_node", "2",
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def assert_no_report(stderr):
    assert "ChildFailedError" not in stderr and "Root Cause" not in stderr and "failed (exitcode" not in stderr, stderr


@pytest.mark.slow
def test_bad_input_in_every_worker_is_said_once(hf_checkpoints, tmp_path):
    _, hf_dir, _ = hf_checkpoints["moe-gqa"]
    result = torchrun("-m", "megatron_patch.convert", "--load-dir", hf_dir, "--save-dir", tmp_path / "out",
                      "--expert-model-parallel-size", 3)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2
    assert errors == ["error: MODEL_PARALLEL_ARGS: --expert-model-parallel-size 3 does not divide the 8 experts"]
    assert_no_report(result.stderr)
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_crashed_worker_is_named_with_its_status(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise RuntimeError('boom in rank 1')\n")
    result = torchrun(script)
    assert result.returncode == 1
    assert "RuntimeError: boom in rank 1" in result.stderr  # the worker's own traceback stays
    assert result.stderr.strip().splitlines()[-1] == (
        "error: worker rank 1 ended with exit status 1; its own output above says why")
    assert_no_report(result.stderr)


def recorded_failure(tmp_path, monkeypatch, rank, message, exitcode=2):
    """A real torchrun ProcessFailure whose error file a worker of ``rank`` wrote through report_input_error."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error-{rank}.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", str(rank))
    assert report_input_error(InputError(message)) == 2
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_the_summary_prefers_the_input_error_and_stays_quiet_when_rank0_said_it(tmp_path, monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    both = {rank: recorded_failure(tmp_path, monkeypatch, rank, "bad setting") for rank in (0, 1)}
    assert capsys.readouterr().err == "error: bad setting\n"  # rank 0 printed it, rank 1 did not
    assert summary(both) == (None, 2)
    killed = ProcessFailure(local_rank=0, pid=1, exitcode=-9, error_file=str(tmp_path / "none.json"))
    only_rank1 = {1: recorded_failure(tmp_path, monkeypatch, 1, "--data-path x: not found"), 0: killed}
    assert summary(only_rank1) == ("error: --data-path x: not found", 2)
    assert summary({0: killed}) == ("error: worker rank 0 ended with signal SIGKILL; its own output above says why", 1)
