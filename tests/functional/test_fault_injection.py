"""Fault injection: kill -9 of the whole training job at random points, then the identical command again.

Every rerun must resume from the latest complete checkpoint (the one the tracker names), with the
losses of an uninterrupted run; no checkpoint may be corrupt, and no process may outlive a kill of
the launcher's process group. The counts are printed.
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_patch.checkpoints import TRACKER_FILE, verify_manifest
from tests.functional.test_training import _processes_mentioning, sft_data
from tests.functional.torchrun import REPO

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ITERATIONS = 10
KILLS = 5


def launch(data: str, out: Path, log) -> subprocess.Popen:
    """run_mcore_qwen3.sh: SFT of tiny-moe on 2 CPU processes, a save every iteration."""
    arguments = ["dsw", "tiny-moe", "1", "2", "3e-3", "3e-4", "128", "128", "fp32", "1", "1", "1", "1", "1", "false",
                 "true", "false", "true", "none", "false", "1", data, data, "none", str(ITERATIONS), "2", str(out)]
    return subprocess.Popen(["bash", str(REPO / "examples/qwen3/run_mcore_qwen3.sh"), *arguments],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MP_SFT_PACKING": "true", "MP_NPROC": "2"})


def checkpoint_dir(out: Path) -> Path | None:
    found = list((out / "checkpoint").glob("*")) if (out / "checkpoint").is_dir() else []
    return found[0] if found else None


def tracked(out: Path) -> int | None:
    folder = checkpoint_dir(out)
    tracker = folder / TRACKER_FILE if folder else None
    return int(tracker.read_text()) if tracker and tracker.is_file() else None


def losses(out: Path) -> list[tuple[int, float]]:
    """(iteration, loss) of every metrics line every run wrote (a line cut by the kill is left out)."""
    found = []
    for path in (out / "log").glob("*/metrics.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                found.append((record["iteration"], record["loss"]))
    return found


def corrupt_checkpoints(out: Path) -> list[str]:
    """Iteration directories that do not verify, and a tracker naming one that is not complete."""
    folder, problems = checkpoint_dir(out), []
    for iteration in sorted(folder.glob("iter_*")) if folder else []:
        try:
            if not (iteration / "metadata.json").is_file() or not verify_manifest(iteration):
                problems.append(f"{iteration}: incomplete or without checksums")
        except Exception as err:  # noqa: BLE001 - whatever is wrong with it, it is reported
            problems.append(f"{iteration}: {err}")
    number = tracked(out)
    if number is not None and not (folder / f"iter_{number:07d}" / "metadata.json").is_file():
        problems.append(f"the tracker names {number}, which is not complete")
    return problems


def kill_job(process: subprocess.Popen, out: Path) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_kill_9_at_random_points_then_rerun_resumes_with_the_uninterrupted_losses(work, tmp_path, capsys):
    data = sft_data(work, 64)
    reference_out = tmp_path / "uninterrupted"
    with open(tmp_path / "uninterrupted.log", "w") as log:
        assert launch(data, reference_out, log).wait(timeout=600) == 0
    reference = dict(losses(reference_out))
    assert sorted(reference) == list(range(1, ITERATIONS + 1))

    out, rng = tmp_path / "killed", random.Random(17)
    kills = during_save = resumes = 0
    survivors, corrupt = [], []
    while kills < KILLS:
        before = tracked(out)
        run_log = tmp_path / f"run{kills}.log"
        with open(run_log, "w") as log:
            process = launch(data, out, log)
            # At least one new save before the kill (so the job advances), then a random moment of an
            # iteration: forward, backward, optimizer step or the save itself.
            deadline = time.monotonic() + 300
            while (tracked(out) or 0) <= (before or 0) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert process.poll() is None, f"the job ended before kill {kills + 1}:\n{run_log.read_text()[-3000:]}"
            time.sleep(rng.uniform(0.0, 1.5))
            kill_job(process, out)
        kills += 1
        folder = checkpoint_dir(out)
        during_save += bool(list(folder.glob(".iter_*.incomplete.*")))  # a save's staging, cut short
        survivors += _processes_mentioning(str(out))
        corrupt += corrupt_checkpoints(out)
        if before is not None:
            resumes += f"resuming from {folder} (iteration {before})" in run_log.read_text()
    with open(tmp_path / "final.log", "w") as log:
        assert launch(data, out, log).wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    final_log = (tmp_path / "final.log").read_text()
    resumes += f"resuming from {checkpoint_dir(out)} (iteration" in final_log
    corrupt += corrupt_checkpoints(out)

    logged = losses(out)
    mismatched = [(i, loss, reference[i]) for i, loss in logged if abs(loss - reference[i]) > 1e-6]
    with capsys.disabled():
        print(f"\nfault injection: {kills} kills of the whole job ({during_save} during a save), "
              f"{len(corrupt)} corrupt checkpoints, {len(survivors)} surviving processes, {resumes} of {kills} "
              f"reruns resumed from the latest complete checkpoint, {len(logged)} logged losses "
              f"({len(mismatched)} off the uninterrupted run's)")
    assert not survivors and not corrupt, (survivors, corrupt)
    assert resumes == kills  # the first run had no checkpoint to resume from; the final rerun did
    assert not mismatched, mismatched
    assert tracked(out) == ITERATIONS and {i for i, _ in logged} == set(range(1, ITERATIONS + 1))
