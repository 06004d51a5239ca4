"""GRPO's prompts (Qwen3 chat template, file:line errors), settings checks and distributed loss parts."""

import json
import re

import pytest
import torch

from megatron_patch.data.chat import Message, generation_prompt
from megatron_patch.rl.config import GrpoSettings
from megatron_patch.rl.objectives import aggregate, aggregate_parts
from megatron_patch.rl.prompts import PromptError, read_prompts
from megatron_patch.rl.rewards import load_reward
from megatron_patch.training.config import TrainConfig, TrainConfigError

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
        '{"label": "1"}': ':1: expected a string "prompt" or a "messages" list',
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
    assert letters("p", "abc", "") == 1.0 and letters("p", "ab 12", "") == pytest.approx(0.4)
    assert letters("p", "", "") == 0.0 and letters("p", "日本", "") == 0.0


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
