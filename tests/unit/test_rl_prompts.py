"""GRPO's prompts (Qwen3 chat template, file:line errors), settings checks and distributed loss parts."""

import json
import re

import pytest
import torch

from megatron_patch.data.chat import Message, generation_prompt
from megatron_patch.data.records import RecordError
from megatron_patch.rl.config import GrpoSettings
from megatron_patch.rl.gsm8k import label_of
from megatron_patch.rl.objectives import aggregate, aggregate_parts
from megatron_patch.rl.prompts import PromptError, PromptKeys, read_prompts
from megatron_patch.rl.rewards import load_reward
from megatron_patch.training.config import TrainConfig, TrainConfigError
from tests.helpers import gsm8k_problems, write_verl_gsm8k_parquet

PROMPTS = {
    "one question": [Message("user", "What is 2 + 3?")],
    "system and question": [Message("system", "You are terse."), Message("user", "Name a prime.")],
    "earlier turns": [Message("user", "Hi"), Message("assistant", "Hello!", reasoning="greet back"),
                      Message("user", "And 7 * 6?")],
}


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("name", PROMPTS)
def test_the_generation_prompt_is_the_tokenizers_template(name, thinking, hf_tokenizer):
    messages = PROMPTS[name]
    turns = [{"role": m.role, "content": m.content} for m in messages]
    expected = hf_tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True,
                                                enable_thinking=thinking)
    assert generation_prompt(messages, enable_thinking=thinking) == expected


def test_prompt_files_read_both_forms_and_name_bad_lines(tokenizer, tmp_path):
    good = tmp_path / "prompts.jsonl"
    good.write_text(json.dumps({"prompt": "2 + 3?", "label": 5}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "7 * 6?"}], "label": "42"}) + "\n")
    first, second = read_prompts([good], tokenizer, max_prompt_length=64)
    assert first.label == "5" and first.where == f"{good}:1" and first.text.endswith("<|im_start|>assistant\n")
    assert second.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert list(first.tokens) == tokenizer.backend.encode(first.text, add_special_tokens=False).ids
    cases = {
        '{"prompt": "x"}': ':1: expected a string "label"',
        '{"label": "1"}': ':1: expected "prompt" as a string or a chat message list (or a "messages" list)',
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "label": "1"}':
            ":1: the last turn must be the user's",
        '{"prompt": "' + "word " * 80 + '", "label": "1"}':
            ":1: the prompt is 89 tokens, over the maximum prompt length 64",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(PromptError, match=re.escape(message)) as raised:
            read_prompts([bad], tokenizer, max_prompt_length=64)
        assert str(bad) in str(raised.value)


def test_verl_parquet_and_slime_jsonl_are_read_as_they_are(tokenizer, tmp_path):
    problems = gsm8k_problems("test", 12)
    parquet = write_verl_gsm8k_parquet(tmp_path / "test.parquet", problems)
    prompts = read_prompts([parquet], tokenizer, max_prompt_length=512)
    assert len(prompts) == 12 and prompts[3].where == f"{parquet}:row 4"
    first = prompts[0]
    assert first.label == label_of(problems[0]["answer"]) and first.data_source == "openai/gsm8k"
    assert first.extra_info["index"] == 0 and first.extra_info["question"] == problems[0]["question"]
    assert problems[0]["question"] in first.text and first.text.endswith("<|im_start|>assistant\n")
    # slime: its own keys, a message list or a string under --input-key, metadata beside.
    slime = tmp_path / "slime.jsonl"
    slime.write_text(json.dumps({"question": [{"role": "user", "content": "2 + 3?"}], "answer": 5,
                                 "metadata": {"id": "a"}}) + "\n"
                     + json.dumps({"question": "7 * 6?", "answer": "42", "metadata": {"id": "b"}}) + "\n")
    keys = PromptKeys(prompt="question", label="answer", metadata="metadata")
    one, two = read_prompts([slime], tokenizer, max_prompt_length=64, keys=keys)
    assert (one.label, one.extra_info, two.label, two.data_source) == ("5", {"id": "a"}, "42", "")
    # A message list and a plain string under the input key render as the kit's own prompt line does.
    kit = tmp_path / "kit.jsonl"
    lines = [{"prompt": "2 + 3?", "label": "5"}, {"prompt": "7 * 6?", "label": "42"}]
    kit.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [p.text for p in read_prompts([kit], tokenizer, 64)] == [one.text, two.text]


def test_bad_verl_rows_are_named_by_row_or_counted_and_skipped(tokenizer, tmp_path, capsys):
    import pyarrow
    import pyarrow.parquet

    good = {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "1 + 1?"}],
            "reward_model": {"style": "rule", "ground_truth": "2"}}
    no_truth = {**good, "reward_model": {"style": "rule", "ground_truth": None}}
    a_string = {**good, "prompt": None}
    path = tmp_path / "train.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([good, no_truth, good]), path)
    with pytest.raises(PromptError, match=re.escape(f"{path}:row 2: expected a string \"label\" or "
                                                    "reward_model.ground_truth")):
        read_prompts([path], tokenizer, max_prompt_length=64)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([good, a_string, no_truth, good]), path)
    with pytest.raises(PromptError, match=re.escape(f"{path}:row 2: expected \"prompt\" as a string or a chat "
                                                    "message list")):
        read_prompts([path], tokenizer, max_prompt_length=64)
    kept = read_prompts([path], tokenizer, max_prompt_length=64, skip_bad_lines=True)
    assert [p.where for p in kept] == [f"{path}:row 1", f"{path}:row 4"]
    assert "skipped 2 bad records" in capsys.readouterr().out
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(RecordError, match="fake.parquet: not a parquet file"):
        read_prompts([tmp_path / "fake.parquet"], tokenizer, max_prompt_length=64)


def test_loss_parts_sum_over_micro_batches_to_the_global_loss():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [5.0, 6.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        parts = [aggregate_parts(values[rows], mask[rows], mode) for rows in (slice(0, 1), slice(1, 3))]
        assert all(denominator.dtype == torch.int32 for _, denominator in parts)  # the schedule sums ints
        whole = sum(n for n, _ in parts) / sum(d for _, d in parts)
        assert whole.item() == pytest.approx(aggregate(values, mask, mode).item()), mode
    numerator, denominator = aggregate_parts(values, mask, "seq-mean-token-sum-norm", norm=5)
    assert (numerator / denominator).item() == pytest.approx((6 + 4 + 11) / 5 / 3)  # Dr.GRPO: mean of sum / L


def test_the_letters_demo_reward():
    letters = load_reward("letters")
    assert letters("p", "abc", "").value == 1.0 and letters("p", "ab 12", "").value == pytest.approx(0.4)
    assert letters("p", "", "").value == 0.0 and letters("p", "日本", "").value == 0.0


@pytest.mark.parametrize("changes, message", [
    ({"seq_length": 64}, "--seq-length 64 is below --max-prompt-length 512 + --max-response-length 512"),
    ({"micro_batch_size": 3}, "do not split into whole micro-batches of --micro-batch-size 3"),
    ({"pipeline_model_parallel_size": 2}, "GRPO needs --pipeline-model-parallel-size 1"),
])
def test_grpo_settings_that_cannot_run_are_named(changes, message):
    config = TrainConfig(data_path=["p.jsonl"], seq_length=1024, global_batch_size=2, micro_batch_size=4)
    GrpoSettings().check(config, data_parallel_size=1)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        GrpoSettings().check(config, data_parallel_size=1)


@pytest.mark.parametrize("config_changes, settings, message", [
    ({}, {"rollout_engine": "vllm", "vllm_sync_bucket_mb": 0}, "--vllm-sync-bucket-mb must be >= 1"),
    ({}, {"rollout_engine": "vllm", "vllm_sleep": True, "rollout_gpus": 2}, "exclude each other"),
    ({}, {"rollout_gpus": 2}, "--vllm-sleep and --rollout-gpus are for --rollout-engine vllm"),
    ({"tensor_model_parallel_size": 2}, {"routing_replay": True}, "--routing-replay needs --tensor-model-parallel"),
    ({}, {"tis_cap": 1.0}, "--tis-cap 1.0 must be > 1"),
    ({}, {"mis_low": 1.2}, "--mis-low 1.2 and --mis-high 2.0 must hold 1"),
    ({}, {"policy_loss": "gspo", "clip_low": 1.0}, "--clip-low 1.0 must be in [0, 1) (gspo; cispo allows 1"),
    ({}, {"policy_loss": "sapo", "clip_high": 0.0}, "--clip-low 1.0 and --clip-high 0.0 are sapo's temperatures"),
    ({}, {"reward_timeout": 0.0}, "--reward-timeout must be a positive number of seconds, got 0.0"),
])
def test_rollout_engine_and_correction_settings_that_cannot_run_are_named(config_changes, settings, message):
    config = TrainConfig(data_path=["p.jsonl"], seq_length=1024, global_batch_size=2, micro_batch_size=4,
                         **config_changes)
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        GrpoSettings(**settings).check(config, data_parallel_size=1)


def test_each_policy_loss_brings_its_own_clip_and_aggregation_unless_given():
    assert (GrpoSettings().clips, GrpoSettings().aggregation) == ((0.2, 0.2), "token-mean")  # as before
    assert (GrpoSettings(policy_loss="gspo").clips, GrpoSettings(policy_loss="gspo").aggregation) == \
        ((3e-4, 4e-4), "seq-mean-token-mean")
    given = GrpoSettings(policy_loss="gspo", clip_high=5e-4, loss_aggregation="token-mean")
    assert (given.clips, given.aggregation) == ((3e-4, 5e-4), "token-mean")
    assert GrpoSettings(policy_loss="sapo").clips == (1.0, 1.05)


def test_one_yaml_file_holds_training_and_grpo_settings(tmp_path):
    from megatron_patch.rl.__main__ import parse_rl_config

    path = tmp_path / "grpo.yaml"
    path.write_text("data_path: [prompts.jsonl]\nlr: 1.0e-6\nseq_length: 2048\nsamples_per_prompt: 4\n"
                    "kl_coef: 0.0\n")
    config, settings, _ = parse_rl_config(["--config", str(path), "--samples-per-prompt", "6"], world_size=1)
    assert config.lr == 1e-6 and config.data_path == ["prompts.jsonl"] and settings.kl_coef == 0.0
    assert settings.samples_per_prompt == 6  # the flag wins over the file
    path.write_text("samples_per_promt: 4\n")
    with pytest.raises(TrainConfigError, match="unknown setting.s. samples_per_promt"):
        parse_rl_config(["--config", str(path)], world_size=1)


def test_a_reward_that_takes_no_label_takes_prompts_without_one(tmp_path, tokenizer):
    """slime and verl accept label-free rows for a format, length or judge reward; users had to invent dummy
    labels. A reward that needs one still refuses such a row in one line."""
    from megatron_patch.rl.reward_worker import check_reward

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Write a word."}\n{"prompt": "Another.", "label": ""}\n{"prompt": "3?", "label": 3}\n')
    reward = tmp_path / "r.py"
    reward.write_text("def brevity(prompt, response):\n    return 1.0 / (1 + len(response))\n\n"
                      "def graded(prompt, response, label=None):\n    return 0.0 if label is None else 1.0\n\n"
                      "def verl(data_source, solution_str, ground_truth=None, extra_info=None):\n    return 1.0\n")
    needs = {name: check_reward(f"custom:{reward}:{name}") for name in ("brevity", "graded", "verl")}
    assert needs == {"brevity": False, "graded": False, "verl": False}
    assert check_reward("gsm8k") and not check_reward("letters")
    prompts = read_prompts([path], tokenizer, max_prompt_length=64, label_required=False)
    assert [p.label for p in prompts] == [None, None, "3"]
    with pytest.raises(PromptError, match=r'p.jsonl:1: expected a string "label"'):
        read_prompts([path], tokenizer, max_prompt_length=64)
    graded = load_reward(f"custom:{reward}:graded")
    assert [graded("p", "r", p.label).value for p in prompts] == [0.0, 0.0, 1.0]
    assert load_reward(f"custom:{reward}:brevity")("p", "abc", None).value == 0.25
    assert load_reward(f"custom:{reward}:verl")("p", "abc", None).value == 1.0


def test_a_prompt_row_may_offer_its_own_tools(tmp_path, tokenizer):
    from megatron_patch.data.chat import Conversation, Message, generation_prompt

    add = {"type": "function", "function": {"name": "add", "description": "Add.",
                                            "parameters": {"type": "object", "properties": {}}}}
    clock = {"type": "function", "function": {"name": "clock", "description": "Time.",
                                              "parameters": {"type": "object", "properties": {}}}}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1 + 1?", "label": "2"}) + "\n"
                    + json.dumps({"prompt": "Time?", "label": "now", "tools": [clock]}) + "\n"
                    + json.dumps({"prompt": "x", "label": "y", "tools": {"clock": 1}}) + "\n")
    with pytest.raises(PromptError, match=r"p.jsonl:3: 'tools' must be a list of function schemas"):
        read_prompts([path], tokenizer, max_prompt_length=512, tools=(add,))
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n")
    default, own = read_prompts([path], tokenizer, max_prompt_length=512, tools=(add,))
    assert default.text == generation_prompt(Conversation([Message("user", "1 + 1?")], (add,)))
    assert own.text == generation_prompt(Conversation([Message("user", "Time?")], (clock,)))
