"""The general rules of every output the kit writes: it never replaces a path the kit did not create (a
file, a link, a directory of other files), and where it cannot write is found before anything runs."""

import json
import os

import pytest

from megatron_patch.checkpoints import CheckpointError, StagedOutput
from megatron_patch.checkpoints.manifest import MANIFEST_FILE, output_made_from
from megatron_patch.outputs import OutputError, check_writable


def _write(final, **options):
    with StagedOutput(final, **options) as staging:
        (staging / "weights.bin").write_bytes(b"new")


def test_a_file_is_never_replaced_even_with_force(tmp_path):
    """Before, MP_SAVE_HF naming a file moved it to a hidden .NAME.replaced.PID and put a directory there."""
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    for options in ({}, {"force": True}, {"force": True, "only_own": True}):
        with pytest.raises(CheckpointError, match="notes.txt is a file, not a directory; the kit never replaces"):
            _write(notes, **options)
    assert notes.read_text() == "the user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no staging, lock or hidden copy


def test_only_own_replaces_the_kits_output_and_never_other_files(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "paper.tex").write_text("draft")
    with pytest.raises(CheckpointError, match="theirs holds files the kit did not write .no checksums.json."):
        _write(theirs, force=True, only_own=True)
    assert (theirs / "paper.tex").read_text() == "draft"

    ours = tmp_path / "ours"
    _write(ours, made_from="/runs/a/iter_0000004")
    assert output_made_from(ours) == "/runs/a/iter_0000004"
    assert json.loads((ours / MANIFEST_FILE).read_text())["files"]["weights.bin"]["size"] == 3
    _write(ours, force=True, only_own=True, made_from="/runs/a/iter_0000008")  # an earlier output of the kit
    assert output_made_from(ours) == "/runs/a/iter_0000008"
    with pytest.raises(CheckpointError, match="is not empty; choose another"):
        _write(ours)  # without force nothing is replaced


def test_a_link_is_not_written_through(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(CheckpointError, match="link is a symbolic link; give the directory itself"):
        _write(tmp_path / "link", force=True)
    assert list((tmp_path / "target").iterdir()) == []


def test_where_nothing_can_be_written_is_found_before_a_run(tmp_path):
    check_writable(tmp_path / "new" / "deeper", "--save-hf")  # created later; nothing is left now
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file is a file, so nothing can be written under it"):
        check_writable(tmp_path / "file" / "hf", "--save-hf")
    with pytest.raises(OutputError, match="--save-hf /proc/mp-out: cannot write in /proc"):
        check_writable("/proc/mp-out", "--save-hf")


def test_no_engine_folder_of_a_killed_job_outlives_the_next_start(tmp_path):
    """kill -9 of a trainer leaves its vLLM folder in shared memory (RAM): the next engine start removes the
    folders of trainers that no longer run, says so, and leaves a running job's alone."""
    import subprocess
    import sys

    from megatron_patch.rl.vllm_engine import FOLDER_PREFIX, remove_stale_folders

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{FOLDER_PREFIX}{ended.stdout.strip()}-abc123"
    running = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-def456"
    for folder in (dead, running):
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"\0" * (3 << 20))
    said = remove_stale_folders(tmp_path)
    assert said == [f"removed {dead} (3.0 MiB of shared memory), left by a killed job (pid {ended.stdout.strip()})"]
    assert not dead.exists() and running.is_dir()
