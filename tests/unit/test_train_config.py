"""megatron_patch.train settings: flags, YAML files and --print-config agree."""

import yaml

from megatron_patch.train import main
from megatron_patch.training.config import parse_config


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
