"""Bad input off the happy path, table-driven: each case through its real entry point gives one
``error:`` line naming the setting, file or line, exit status 2, no traceback, and leaves
nothing behind but its inputs."""

import json
import shutil

import pytest

from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.data.build_sft import main as build_sft_main
from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
from megatron_patch.train import main as train_main
from megatron_patch.training.launch import main as launch_main
from tests.unit.test_launch import arguments


def _config_with(hf_dir, folder, **fields):
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))
    return folder


def _hf_config_list(hf_dir, folder):
    shutil.copytree(hf_dir, folder)
    (folder / "config.json").write_text("[1, 2]")
    return folder


def _garbage_tracker(hf_dir, folder):
    folder.mkdir()
    (folder / "latest_checkpointed_iteration.txt").write_text("soon\n")
    return folder


def _lines(folder, text):
    folder.mkdir()
    (folder / "train.jsonl").write_text(text)
    return folder / "train.jsonl"


# id: (entry point, arguments given the work folder and an HF model, environment, expected message)
CASES = {
    "launcher LR=nan": (launch_main, lambda d, hf: arguments(LR="nan"), {},
                        "LR (argument 5) must be a finite number, got 'nan'"),
    "launcher WORLD_SIZE=abc": (launch_main, lambda d, hf: arguments(ENV="dlc"), {"WORLD_SIZE": "abc"},
                                "WORLD_SIZE must be an integer, got 'abc'"),
    "trainer --lr nan": (train_main, lambda d, hf: ["--lr", "nan", "--data-path", "x", "--print-config"], {},
                         "--lr must be a finite number, got nan"),
    "config.json: a string for a number": (
        convert_main, lambda d, hf: ["--load-dir", _config_with(hf, d / "hf", num_hidden_layers="four"),
                                     "--save-dir", d / "out"], {},
        "config.json: num_hidden_layers must be an integer, got 'four'"),
    "config.json: not an object": (
        convert_main, lambda d, hf: ["--load-dir", _hf_config_list(hf, d / "hf"), "--save-dir", d / "out"], {},
        "config.json: expected a JSON object of settings, got list"),
    "garbage tracker": (
        convert_main, lambda d, hf: ["--mg2hf", "--load-dir", _garbage_tracker(hf, d / "run"), "--hf-dir", hf,
                                     "--save-dir", d / "out"], {},
        "latest_checkpointed_iteration.txt: expected an iteration number or 'release', got 'soon'"),
    "garbage --iteration": (
        convert_main, lambda d, hf: ["--mg2hf", "--load-dir", _garbage_tracker(hf, d / "run"), "--hf-dir", hf,
                                     "--iteration", "last", "--save-dir", d / "out"], {},
        "--iteration: expected an iteration number or 'release', got 'last'"),
    "empty SFT input": (
        build_sft_main, lambda d, hf: ["--input", _lines(d / "data", ""), "--tokenizer",
                                       bundled_qwen3_tokenizer_dir(), "--seq-length", "64", "--output-prefix",
                                       d / "out" / "sft"], {},
        "train.jsonl: no usable sample"),
    "JSON line nested 100k deep": (
        build_sft_main, lambda d, hf: ["--input", _lines(d / "data", "[" * 100_000 + "\n"), "--tokenizer",
                                       bundled_qwen3_tokenizer_dir(), "--seq-length", "64", "--output-prefix",
                                       d / "out" / "sft", "--skip-bad-lines"], {},
        "nested too deeply"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_leaves_nothing(case, hf_checkpoints, tmp_path, capsys, monkeypatch):
    entry, make_arguments, environment, message = CASES[case]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    _, hf_dir, _ = hf_checkpoints["dense-tied"]
    status = entry([str(a) for a in make_arguments(tmp_path, hf_dir)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*incomplete*"))
