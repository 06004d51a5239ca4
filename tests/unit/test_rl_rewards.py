"""Rewards: gsm8k by verl's rules on the real GSM8K test set, user functions that fail loudly, the converter."""

import json

import pytest

from megatron_patch.rl.gsm8k import INSTRUCTION, label_of
from megatron_patch.rl.gsm8k import main as gsm8k_main
from megatron_patch.rl.reward_worker import RewardProcess, Scorer, check_reward
from megatron_patch.rl.rewards import Reward, RewardError, Score, gsm8k_flexible, gsm8k_strict, load_reward
from tests.helpers import gsm8k_problems


def test_every_gold_solution_scores_one_and_a_changed_answer_zero():
    problems = gsm8k_problems("test")
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
    assert reward("p", "abcde", "x").value == 0.5 and reward.style == "kit"
    with pytest.raises(RewardError, match=r"reward custom:.*:broken failed on prompts.jsonl:3 sample 2: KeyError: 'x'"):
        load_reward(f"custom:{source}:broken")("p", "r", "x", where="prompts.jsonl:3 sample 2")
    with pytest.raises(RewardError, match="returned nan on a sample; expected a finite number"):
        load_reward(f"custom:{source}:nan")("p", "r", "x")


VERL_REWARDS = """
import re

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    # verl's signature, with a dict return: score plus numbers verl would log
    found = re.findall(r"#### (-?[0-9.,]+)", solution_str)
    correct = bool(found) and found[-1].replace(",", "") == ground_truth
    return {"score": float(correct), "acc": float(correct), "formatted": float(bool(found)),
            "pred": found[-1] if found else "", "split": extra_info["split"], "source": data_source}

def no_extra_info(data_source, solution_str, ground_truth):
    return 1.0 if data_source == "openai/gsm8k" else 0.0

def no_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}

def bad_row(data_source, solution_str, ground_truth, extra_info=None):
    return extra_info["index"] / 0
"""


def test_a_verl_reward_function_is_called_as_verl_calls_it_and_its_extras_are_kept(tmp_path):
    source = tmp_path / "verl_reward.py"
    source.write_text(VERL_REWARDS)
    reward = load_reward(f"custom:{source}:compute_score")
    assert (reward.style, reward.takes_extra_info) == ("verl", True)
    extra = {"split": "test", "index": 4}
    score = reward("prompt text", "so #### 1,234", "1234", data_source="openai/gsm8k", extra_info=extra)
    assert score.value == 1.0 and score.extras == {"acc": 1.0, "formatted": 1.0}  # strings are not metrics
    assert reward("p", "no answer", "1234", extra_info=extra).extras == {"acc": 0.0, "formatted": 0.0}
    assert load_reward(f"custom:{source}:no_extra_info")("p", "r", "1", data_source="openai/gsm8k").value == 1.0
    with pytest.raises(RewardError, match=r'no_score returned a dict without "score" on train.parquet:row 2'):
        load_reward(f"custom:{source}:no_score")("p", "r", "1", where="train.parquet:row 2")
    with pytest.raises(RewardError, match=r"bad_row failed on train.parquet:row 7 .sample 3.: ZeroDivisionError"):
        load_reward(f"custom:{source}:bad_row")("p", "r", "1", where="train.parquet:row 7 (sample 3)",
                                                extra_info={"index": 6})


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
    problems = gsm8k_problems("test", 5)
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


UNRULY_REWARDS = """
import os, sys, time

def exits(prompt, response, label):
    sys.exit(0)

def exits_3(prompt, response, label):
    sys.exit(3)

def ends_the_process(prompt, response, label):
    os._exit(0)

def never_returns(prompt, response, label):
    time.sleep(3600)

def interrupts(prompt, response, label):
    raise KeyboardInterrupt
"""

NUMERIC_REWARDS = """
import numpy as np
import torch

def numpy_half(prompt, response, label):
    return np.float32(0.5)

def numpy_dict(prompt, response, label):
    return {"score": np.int64(1), "length": np.float64(len(response)), "tensor": torch.tensor(2.0)}

def numpy_bool(prompt, response, label):
    return np.bool_(True)
"""


@pytest.mark.parametrize("function, message", [
    ("exits", r"reward custom:.*:exits called sys.exit\(0\) on p.jsonl:4 sample 2$"),
    ("exits_3", r"reward custom:.*:exits_3 called sys.exit\(3\) on p.jsonl:4 sample 2$"),
    ("ends_the_process", r"ends_the_process ended the process it runs in on p.jsonl:4 sample 2: it exited with "
                         r"status 0 without answering"),
    ("interrupts", r"interrupts raised KeyboardInterrupt on p.jsonl:4 sample 2$"),
    ("never_returns", r"never_returns did not return within 1 s on p.jsonl:4 sample 2; its process .pid \d+. was "
                      r"killed .--reward-timeout / MP_GRPO_REWARD_TIMEOUT"),
])
def test_a_reward_that_exits_hangs_or_interrupts_stops_in_one_line_naming_it(function, message, tmp_path):
    """In the trainer's process sys.exit(0) / os._exit(0) ended the job with status 0 and no step, and a hang
    held it for ever: a user's reward runs in a process of its own, with a timeout."""
    (tmp_path / "unruly.py").write_text(UNRULY_REWARDS)
    reward = RewardProcess(f"custom:{tmp_path / 'unruly.py'}:{function}", timeout=1)
    try:
        with pytest.raises(RewardError, match=message):
            reward("p", "r", "x", where="p.jsonl:4 sample 2")
    finally:
        reward.close()
    assert reward.process.poll() is not None  # nothing left running


def test_numeric_scalars_of_any_type_are_rewards_and_bools_are_not(tmp_path):
    (tmp_path / "numeric.py").write_text(NUMERIC_REWARDS)
    spec = f"custom:{tmp_path / 'numeric.py'}"
    assert load_reward(f"{spec}:numpy_half")("p", "r", "x").value == 0.5
    score = load_reward(f"{spec}:numpy_dict")("p", "abc", "x")
    assert score.value == 1.0 and score.extras == {"length": 3.0, "tensor": 2.0}
    with pytest.raises(RewardError, match="returned (np.)?True_? on a sample; expected a finite number"):
        load_reward(f"{spec}:numpy_bool")("p", "r", "x")
    worker = RewardProcess(f"{spec}:numpy_dict")  # the same through the reward's own process
    try:
        assert worker("p", "abcd", "x") == Score(1.0, {"length": 4.0, "tensor": 2.0})
    finally:
        worker.close()


def test_a_reward_file_that_exits_while_imported_is_named(tmp_path):
    (tmp_path / "leaves.py").write_text("import sys\nsys.exit(0)\ndef f(p, r, l):\n    return 1.0\n")
    with pytest.raises(RewardError, match=r"leaves.py:f called sys.exit\(0\) while its file was imported"):
        check_reward(f"custom:{tmp_path / 'leaves.py'}:f")
    builtin = Scorer("gsm8k")  # the kit's own rewards run in the trainer's process
    assert isinstance(builtin.inline, Reward) and builtin.processes == []


SLOW_REWARD = """
import os
import time

def slow(prompt, response, label):
    time.sleep(0.3)  # still busy when the next response is submitted
    return {"score": float(len(response)), "worker": os.getpid()}

def stalls_on_the_third(prompt, response, label):
    if response == "r2":
        time.sleep(3600)
    return 1.0
"""


def test_a_scorer_shares_requests_over_its_workers_and_answers_by_key(tmp_path):
    """Each submitted response goes to the least busy worker: four at once to four workers, so a slow reward
    scores them side by side; each key comes back with its own score whatever order the workers finish in."""
    (tmp_path / "slow.py").write_text(SLOW_REWARD)
    scorer = Scorer(f"custom:{tmp_path / 'slow.py'}:slow", workers=4)
    try:
        for key in range(4):
            scorer.submit(key, "p", "x" * (key + 1), "l", where=f"p.jsonl:1 sample {key + 1}")
        scores = scorer.collect()
        assert [scores[key].value for key in range(4)] == [1.0, 2.0, 3.0, 4.0]
        assert len({score.extras["worker"] for score in scores.values()}) == 4
        assert {score.extras["worker"] for score in scores.values()} == {p.process.pid for p in scorer.processes}
        assert scorer.collect() == {}
    finally:
        scorer.close()


def test_a_request_stuck_behind_others_is_timed_from_when_it_began(tmp_path):
    """One worker, three requests queued: the third never returns; its timeout counts from when the second
    answered, and the line names the third sample."""
    (tmp_path / "slow.py").write_text(SLOW_REWARD)
    scorer = Scorer(f"custom:{tmp_path / 'slow.py'}:stalls_on_the_third", timeout=1)
    try:
        for key in range(3):
            scorer.submit(key, "p", f"r{key}", "l", where=f"p.jsonl:2 sample {key + 1}")
        with pytest.raises(RewardError, match=r"did not return within 1 s on p.jsonl:2 sample 3; its process"):
            scorer.collect()
    finally:
        scorer.close()
