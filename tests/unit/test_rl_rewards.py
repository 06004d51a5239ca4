"""Rewards: gsm8k by verl's rules on the real GSM8K test set, user functions that fail loudly, the converter."""

import json
from pathlib import Path

import pytest

from megatron_patch.rl.gsm8k import INSTRUCTION, label_of
from megatron_patch.rl.gsm8k import main as gsm8k_main
from megatron_patch.rl.rewards import RewardError, gsm8k_flexible, gsm8k_strict, load_reward

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"


def gsm8k_test_set():
    path = GSM8K / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found: the GSM8K release is expected beside the project (../shared/data/gsm8k)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_gold_solution_scores_one_and_a_changed_answer_zero():
    problems = gsm8k_test_set()
    assert len(problems) == 1319
    for problem in problems:
        label = label_of(problem["answer"])
        gold = problem["answer"]
        assert gsm8k_strict("", gold, label) == 1.0, gold[-80:]
        head, _, number = gold.rpartition("#### ")
        changed = f"{head}#### {int(float(number.replace(',', ''))) + 1}"
        assert gsm8k_strict("", changed, label) == 0.0, changed[-80:]


def test_strict_and_flexible_rules():
    assert label_of("so 1,000 + 234\n#### 1,234") == "1234"
    assert gsm8k_strict("", "#### 1,234", "1234") == 1.0
    assert gsm8k_strict("", "first #### 7 then #### 8", "8") == 1.0  # the last match wins
    assert gsm8k_strict("", "first #### 7 then #### 8", "7") == 0.0
    assert gsm8k_strict("", "the answer is 8", "8") == 0.0  # strict wants the format
    assert gsm8k_strict("", "#### 8" + " " * 300, "8") == 0.0  # only the last 300 characters count
    assert gsm8k_flexible("", "the answer is 8", "8") == 1.0
    assert gsm8k_flexible("", "the answer is 8.", "8") == 0.0  # verl's rule: "8." is the number, as written
    assert gsm8k_flexible("", "3 apples, then 5", "5") == 1.0
    assert gsm8k_flexible("", "no number", "5") == 0.0


def test_a_custom_reward_is_loaded_and_its_failures_name_the_sample(tmp_path):
    source = tmp_path / "reward.py"
    source.write_text("def length(prompt, response, label):\n    return len(response) / 10\n\n"
                      "def broken(prompt, response, label):\n    return {'score': 1}[label]\n\n"
                      "def nan(prompt, response, label):\n    return float('nan')\n")
    reward = load_reward(f"custom:{source}:length")
    assert reward("p", "abcde", "x") == 0.5
    with pytest.raises(RewardError, match=r"reward custom:.*:broken failed on prompts.jsonl:3 sample 2: KeyError: 'x'"):
        load_reward(f"custom:{source}:broken")("p", "r", "x", where="prompts.jsonl:3 sample 2")
    with pytest.raises(RewardError, match="returned nan on a sample; expected a finite number"):
        load_reward(f"custom:{source}:nan")("p", "r", "x")


@pytest.mark.parametrize("spec, message", [
    ("gsm9k", "expected gsm8k, gsm8k-flexible, letters or custom:PATH.py:FUNCTION"),
    ("custom:{d}/missing.py:f", "missing.py not found"),
    ("custom:{d}/reward.py:absent", "reward.py has no function absent"),
    ("custom:{d}/syntax.py:f", "syntax.py:1: "),
    ("custom:{d}/reward.py", "expected custom:PATH.py:FUNCTION"),
])
def test_a_reward_that_cannot_load_is_named(spec, message, tmp_path):
    (tmp_path / "reward.py").write_text("def f(p, r, l):\n    return 1.0\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with pytest.raises(RewardError, match=message.replace("(", r"\(")):
        load_reward(spec.format(d=tmp_path))


def test_the_converter_writes_prompts_with_labels(tmp_path, capsys):
    problems = gsm8k_test_set()[:5]
    source = tmp_path / "test.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in problems))
    assert gsm8k_main(["--input", str(source), "--output", str(tmp_path / "prompts.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [line["label"] for line in lines] == [label_of(p["answer"]) for p in problems]
    assert lines[0]["prompt"] == f"{problems[0]['question']} {INSTRUCTION}"
    source.write_text(json.dumps(problems[0]) + "\n" + json.dumps({"question": "q", "answer": "no final"}) + "\n")
    assert gsm8k_main(["--input", str(source), "--output", str(tmp_path / "bad.jsonl")]) == 2
    assert f"error: {source}:2: the answer has no final '#### N'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*bad*")) and not list(tmp_path.glob(".bad*"))
