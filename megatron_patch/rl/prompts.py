"""GRPO prompt files: JSONL lines ``{"prompt": "..."}`` or ``{"messages": [...]}``, each with a ``"label"``.

A prompt is rendered as a Qwen3 chat prompt (``data/chat.py``: the tokenizer's template, generation
prompt added, with or without thinking) and tokenized once, when the file is read. A bad line
stops the run with ``file:line``; so does a prompt longer than the maximum prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.data.chat import Message, SampleError, generation_prompt, prompt_messages
from megatron_patch.data.records import ReadStats, RecordError, iter_records


class PromptError(RecordError):
    """A prompt line that cannot be used; the message starts with file:line."""


@dataclass(frozen=True)
class Prompt:
    where: str  # file:line
    text: str  # the rendered chat prompt the model continues
    tokens: tuple[int, ...]
    label: str


def _messages(record, where: str) -> list[Message]:
    if not isinstance(record, dict):
        raise PromptError(f"{where}: expected an object with \"prompt\" or \"messages\", and \"label\"")
    if isinstance(record.get("prompt"), str):
        return [Message("user", record["prompt"])]
    if "messages" not in record:
        raise PromptError(f"{where}: expected a string \"prompt\" or a \"messages\" list")
    try:
        return prompt_messages(record["messages"])
    except SampleError as err:
        raise PromptError(f"{where}: {err}") from None


def _label(record: dict, where: str) -> str:
    label = record.get("label")
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str):
        raise PromptError(f"{where}: expected a string \"label\" (the answer the reward compares with)")
    return label


def read_prompts(paths: list[str | Path], tokenizer, max_prompt_length: int,
                 enable_thinking: bool = True) -> list[Prompt]:
    """Every prompt of ``paths`` in order, rendered and tokenized (``tokenizer``: data.tokenizer.Qwen3Tokenizer)."""
    prompts = []
    stats = ReadStats()
    for path in paths:
        for where, record in iter_records(path, stats):
            text = generation_prompt(_messages(record, where), enable_thinking)
            label = _label(record, where)
            tokens = tuple(tokenizer.backend.encode(text, add_special_tokens=False).ids)
            if len(tokens) > max_prompt_length:
                raise PromptError(f"{where}: the prompt is {len(tokens)} tokens, over the maximum prompt length "
                                  f"{max_prompt_length} (MP_GRPO_MAX_PROMPT_LENGTH)")
            prompts.append(Prompt(where, text, tokens, label))
    if not prompts:
        raise PromptError(f"{', '.join(map(str, paths))}: no prompts")
    return prompts
