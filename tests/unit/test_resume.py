"""A rerun never goes backwards: the tracker never moves to an older iteration, and a run that would
start before its --save's latest checkpoint is refused before it trains (auto-resume is tested with
real launches in tests/functional/test_training.py)."""

import pytest

from megatron_patch.checkpoints import CheckpointError, tracked_iteration, write_tracker
from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.training.config import TrainConfigError, parse_config
from megatron_patch.training.loop import train
from tests.helpers import build_pretrain_data


def test_the_tracker_never_moves_back(tmp_path):
    write_tracker(tmp_path, 6)
    write_tracker(tmp_path, 6)  # the same iteration again (a save repeated after a crash) is fine
    with pytest.raises(CheckpointError, match="names iteration 6; a save of iteration 2 would move it back"):
        write_tracker(tmp_path, 2)
    assert tracked_iteration(tmp_path) == 6
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("six\n")
    with pytest.raises(CheckpointError, match="expected an iteration number or 'release', got 'six'"):
        tracked_iteration(tmp_path)


def test_starting_over_into_a_save_with_later_checkpoints_is_refused(hf_checkpoints, megatron_world, tmp_path):
    _, hf_dir, _ = hf_checkpoints["dense-tied"]
    assert convert_main(["--load-dir", str(hf_dir), "--save-dir", str(tmp_path / "mcore"), "--precision", "fp32"]) == 0
    save = tmp_path / "run"
    (save / "iter_0000006").mkdir(parents=True)
    (save / "iter_0000006" / "metadata.json").write_text("{}")  # what marks a complete checkpoint
    write_tracker(save, 6)
    config, _ = parse_config(["--model", str(hf_dir), "--load", str(tmp_path / "mcore"), "--save", str(save),
                              "--no-auto-resume", "--data-path", build_pretrain_data(tmp_path / "data"),
                              "--precision", "fp32", "--seq-length", "32", "--global-batch-size", "1",
                              "--train-iters", "8"])
    with pytest.raises(TrainConfigError, match=f"--save {save} already holds iteration 6 and this run would start "
                                               "at 0 .--no-auto-resume starts over."):
        train(config)
    assert tracked_iteration(save) == 6
