"""Helpers the tests share (kept out of the library: nothing in megatron_patch needs them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_patch.training.steps import OptimizerSettings, build_optimizer, lm_batch, train_step, wrap_with_ddp


def train_on_fixed_batch(model_chunks, tokens: torch.Tensor, steps: int, lr: float = 1e-3, num_microbatches: int = 2):
    """Smoke-train on one batch split into micro-batches; returns (loss per step, optimizer).

    Losses are reported on the last pipeline stage (None elsewhere).
    """
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    ddp_chunks = wrap_with_ddp(chunks)
    optimizer = build_optimizer(ddp_chunks, OptimizerSettings(lr=lr, weight_decay=0.0))
    micro_batches = [lm_batch(part) for part in torch.chunk(tokens, num_microbatches)]
    losses = []
    for _ in range(steps):
        data = [iter(micro_batches) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(micro_batches)
        result = train_step(
            ddp_chunks, optimizer, data, num_microbatches, tokens.shape[1] - 1, micro_batches[0]["tokens"].shape[0]
        )
        losses.append(result["loss"])
    return losses, optimizer


def build_pretrain_data(folder: Path, truncate_idx: bool = False) -> str:
    """A real PREFIX.bin/.idx of eight short documents, built by build_pretrain (its .idx cut short when asked)."""
    from megatron_patch.data.build_pretrain import main as build_pretrain_main
    from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(8)))
    prefix = folder / "corpus"
    assert build_pretrain_main(["--input", str(source), "--tokenizer", str(bundled_qwen3_tokenizer_dir()),
                                "--output-prefix", str(prefix)]) == 0
    if truncate_idx:
        idx = Path(f"{prefix}.idx")
        idx.write_bytes(idx.read_bytes()[:-20])
    return str(prefix)


def teacher_forced_log_probs(model, vocab_size: int, prompts: list[list[int]], completions, scale: float) -> list:
    """Per completion, the training forward's log-probs of its tokens (vocabulary-parallel logits, sequence
    parallelism as configured) on prompt + completion, right-padded to a multiple of 4 (SP splits it)."""
    from megatron_patch.models.log_probs import token_log_probs

    sequences = [prompt + completion.tokens for prompt, completion in zip(prompts, completions)]
    width = -(-max(map(len, sequences)) // 4) * 4
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = torch.tensor(sequence)
    with torch.no_grad():
        positions = torch.arange(width).expand_as(tokens)
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
        log_probs = token_log_probs(logits[:, :-1], tokens[:, 1:], scale, vocab_size)
    return [log_probs[row, len(prompt) - 1:len(prompt) - 1 + len(completion.tokens)]
            for row, (prompt, completion) in enumerate(zip(prompts, completions))]


def rollout_log_prob_gap(model, vocab_size: int, prompts: list[list[int]], sampling, seed: int, slots: int = 0):
    """(completions, max |rollout log-prob - teacher-forced log-prob|) over every generated token."""
    from megatron_patch.models.generation import generate, sampling_generator

    completions = generate(model, prompts, sampling, vocab_size, sampling_generator(seed), slots=slots)
    forced = teacher_forced_log_probs(model, vocab_size, prompts, completions, sampling.scale)
    gap = max((f - torch.tensor(c.log_probs)).abs().max().item() for f, c in zip(forced, completions))
    return completions, gap


GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def gsm8k_problems(split: str = "test", count: int | None = None) -> list[dict]:
    """The GSM8K release's problems (``../shared/data/gsm8k``; a test without it skips, saying so)."""
    import pytest

    path = GSM8K / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found: the GSM8K release is expected beside the project (../shared/data/gsm8k)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:count]]


def write_verl_gsm8k_parquet(path: Path, problems: list[dict], split: str = "test") -> Path:
    """A parquet file laid out as verl's gsm8k preprocessing writes it: a chat-message prompt with
    its instruction, data_source, ability, reward_model {style, ground_truth} and extra_info."""
    import re

    import pyarrow
    import pyarrow.parquet

    instruction = 'Let\'s think step by step and output the final answer after "####".'
    rows = []
    for index, problem in enumerate(problems):
        solution = re.search("#### (\\-?[0-9\\.\\,]+)", problem["answer"]).group(1).replace(",", "")
        rows.append({
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": problem["question"] + " " + instruction}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": solution},
            "extra_info": {"split": split, "index": index, "answer": problem["answer"],
                           "question": problem["question"]},
        })
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


# The tools of the tool-calling tests (rl/tools.py): plain functions with type hints and docstrings.
TOOL_FUNCTIONS = '''
import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a * b


def weather(city: str) -> dict:
    """Today's weather in a city.

    Args:
        city: The city's name.
    """
    if city == "nowhere":
        raise ValueError("no such city")
    if city == "slow":
        time.sleep(3600)
    return {"city": city, "sky": "clear"}
'''
