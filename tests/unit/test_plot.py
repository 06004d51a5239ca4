import json

from megatron_patch.plot import main, run_name


def test_plots_are_named_after_the_run_not_the_log_folder(tmp_path, capsys):
    log = tmp_path / "qwen3-a3b-sft" / "log"
    log.mkdir(parents=True)
    records = [{"iteration": i, "loss": 5.0 - i / 10, "lr": 1e-4 * i} for i in range(1, 6)]
    records += [{"iteration": 5, "valid_loss": 4.7, "valid_ppl": 110.0}]
    (log / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_name(log / "metrics.jsonl") == "qwen3-a3b-sft"
    assert run_name(tmp_path / "named" / "metrics.jsonl") == "named"
    assert main([str(tmp_path)]) == 0
    assert (log / "loss.png").stat().st_size > 1000
    assert not (log / "expert_load.png").exists()  # a dense run has no expert load
    assert f"wrote {log / 'loss.png'}" in capsys.readouterr().out


def test_a_bad_metrics_line_is_named(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\nnot json\n')
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'}:2: not a JSON line" in capsys.readouterr().err
