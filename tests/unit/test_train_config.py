"""megatron_patch.train settings: flags, YAML files and --print-config agree."""

from pathlib import Path

import pytest
import yaml

from megatron_patch.train import main
from megatron_patch.training.config import parse_config

DEMO = Path(__file__).resolve().parents[2] / "megatron_patch" / "resources" / "demo_sft.jsonl"


def test_printed_settings_read_back_as_the_same_config(tmp_path, capsys):
    flags = ["--model", "tiny-moe", "--data-path", "0.7", "a", "0.3", "b", "--lora-rank", "8",
             "--lora-target-modules", "q_proj", "o_proj", "--train-iters", "7"]
    assert main([*flags, "--print-config"]) == 0
    printed = capsys.readouterr().out
    settings = yaml.safe_load(printed)
    assert settings["lora_target_modules"] == ["q_proj", "o_proj"]
    assert settings["data_path"] == ["0.7", "a", "0.3", "b"]
    saved = tmp_path / "run.yaml"
    saved.write_text(printed)
    assert parse_config(["--config", str(saved)])[0] == parse_config(flags)[0]


def test_a_missing_data_path_is_named(capsys):
    assert main(["--model", "tiny-moe", "--print-config"]) == 2
    assert "--data-path is required" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--save-hf", "out-hf"], "--save-hf and --save-peft are written from the final save: they need --save"),
    (["--save", "run", "--save-hf-interval", "5"], "--save-hf-interval needs --save-hf"),
    (["--save", "run", "--save-peft", "peft"], "--save-peft writes LoRA adapters: it needs --lora-rank > 0"),
    (["--save", "run", "--save-hf", "run/hf"], "--save-hf run/hf is, contains or lies inside --save run"),
    (["--save", "run", "--load", "base", "--save-hf", "base"], "--save-hf base is, contains or lies inside --load"),
    (["--save", "run", "--lora-rank", "4", "--save-hf", "out", "--save-peft", "out/peft"],
     "--save-hf out is, contains or lies inside --save-peft out/peft"),
    # Inputs through a link, and the model directory (argument 2), are inputs too.
    (["--save", "run", "--load", "base", "--save-hf", "link-to-base"],
     "--save-hf link-to-base is, contains or lies inside --load base"),
    (["--model", "model", "--save", "model/run"], "--save model/run is or lies inside --model model"),
    (["--model", "model", "--save", "run", "--save-hf", "model"],
     "--save-hf model is, contains or lies inside --model model"),
])
def test_hf_outputs_that_cannot_be_written_are_refused_at_once(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("model", "base"):
        (tmp_path / folder).mkdir()
    (tmp_path / "link-to-base").symlink_to(tmp_path / "base")
    model = flags[flags.index("--model") + 1] if "--model" in flags else "tiny-moe"
    assert main(["--model", model, "--data-path", "d", *flags, "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_an_hf_output_over_files_the_kit_did_not_write_is_refused_before_training(capsys, tmp_path):
    from megatron_patch.training.config import TrainConfigError
    from megatron_patch.training.preflight import check_inputs

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    config = parse_config(["--model", "tiny-moe", "--dataset-type", "raw", "--train-mode", "finetune", "--data-path",
                           str(DEMO), "--save", str(tmp_path / "run"), "--save-hf", str(tmp_path / "mine")])[0]
    with pytest.raises(TrainConfigError, match="holds files the kit did not write"):
        check_inputs(config)
    (tmp_path / "mine" / "checksums.json").write_text("{}")  # an earlier HF output of the kit is replaced
    check_inputs(config)
