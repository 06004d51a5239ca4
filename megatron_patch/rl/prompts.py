"""GRPO prompt files, in the kit's form and as verl and slime write them.

- The kit's JSONL: ``{"prompt": "..."}`` or ``{"messages": [...]}``, each with a ``"label"``.
- verl's (parquet or JSONL, as its gsm8k preprocessing writes them): ``prompt`` is a chat message
  list, the answer is ``reward_model.ground_truth``, and ``data_source`` and ``extra_info`` travel
  with the sample to the reward function.
- slime's JSONL: the prompt under ``--input-key`` (a string or a message list), the answer under
  ``--label-key``, metadata under ``--metadata-key``.

A prompt is rendered as a Qwen3 chat prompt (``data/chat.py``: the tokenizer's template, generation
prompt added, with or without thinking) and tokenized once, when the file is read. A bad line
or row stops the run with ``file:line`` (``file:row N`` in parquet), or is counted and skipped
with ``--skip-bad-lines``; a prompt longer than the maximum prompt length always stops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.data.chat import Conversation, Message, SampleError, generation_prompt, prompt_messages, tools_of
from megatron_patch.data.records import ReadStats, RecordError, iter_records


class PromptError(RecordError):
    """A prompt line that cannot be used; the message starts with file:line."""


@dataclass(frozen=True)
class PromptKeys:
    """Where a record keeps its parts (slime's --input-key, --label-key, --metadata-key)."""

    prompt: str = "prompt"  # a string or a chat message list; "messages" when the record has no such key
    label: str = "label"  # without it, verl's reward_model.ground_truth
    metadata: str = "extra_info"  # handed to the reward as extra_info


@dataclass(frozen=True)
class Prompt:
    where: str  # file:line
    text: str  # the rendered chat prompt the model continues
    tokens: tuple[int, ...]
    label: object  # the answer: a string (numbers become strings), or a JSON list/object as given
    data_source: str = ""  # verl's data_source ("" when the file has none)
    extra_info: object = None  # verl's extra_info / slime's metadata, as given
    messages: tuple[dict, ...] = ()  # the conversation before the model's turn ({"role", "content"}), as given


def _messages(record: dict, where: str, keys: PromptKeys) -> list[Message]:
    value = record.get(keys.prompt)
    if isinstance(value, str):
        return [Message("user", value)]
    if value is None and keys.prompt == "prompt" and "messages" in record:
        value = record["messages"]
    if not isinstance(value, list):
        raise PromptError(f"{where}: expected \"{keys.prompt}\" as a string or a chat message list"
                          + (" (or a \"messages\" list)" if keys.prompt == "prompt" else ""))
    try:
        return prompt_messages(value)
    except SampleError as err:
        raise PromptError(f"{where}: {err}") from None


def _label(record: dict, where: str, keys: PromptKeys, required: bool) -> object:
    if keys.label in record:
        label = record[keys.label]
    elif isinstance(record.get("reward_model"), dict) and "ground_truth" in record["reward_model"]:
        label = record["reward_model"]["ground_truth"]
    else:
        label = None
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        label = str(label)
    missing = label is None or (isinstance(label, str) and not label.strip())
    if missing and not required:
        return None
    if missing or isinstance(label, bool):
        raise PromptError(f"{where}: expected a string \"{keys.label}\" or reward_model.ground_truth (the answer "
                          "the reward compares with)")
    return label


def parse_prompt(record, where: str, keys: PromptKeys, enable_thinking: bool, label_required: bool = True,
                 tools: tuple[dict, ...] = ()) -> tuple[str, object, str, object, tuple[dict, ...]]:
    """(rendered prompt, label, data_source, extra_info, messages) of one record; raises PromptError naming
    ``where``.
    Without ``label_required`` (a reward that takes no label) a missing label is None; ``tools`` (function
    schemas, --tools) are offered in the rendered prompt's system turn, or the record's own ``tools``
    column when it has one (a subset or other descriptions; the calls still run the --tools functions)."""
    if not isinstance(record, dict):
        raise PromptError(f"{where}: expected an object with a prompt and a label")
    messages = _messages(record, where, keys)
    if record.get("tools") is not None:  # the row's own tools (function schemas) instead of --tools'
        try:
            tools = tools_of(record["tools"])
        except SampleError as err:
            raise PromptError(f"{where}: {err}") from None
    text = generation_prompt(Conversation(messages, tools), enable_thinking)
    source = record.get("data_source")
    label = _label(record, where, keys, label_required)
    conversation = tuple({"role": m.role, "content": m.content} for m in messages)
    return text, label, source if isinstance(source, str) else "", record.get(keys.metadata), conversation


def read_prompts(paths: list[str | Path], tokenizer, max_prompt_length: int, enable_thinking: bool = True,
                 keys: PromptKeys = PromptKeys(), skip_bad_lines: bool = False,
                 label_required: bool = True, tools: tuple[dict, ...] = ()) -> list[Prompt]:
    """Every prompt of ``paths`` in order, rendered and tokenized (``tokenizer``: data.tokenizer.Qwen3Tokenizer)."""
    prompts = []
    stats = ReadStats()
    for path in paths:
        for where, record in iter_records(path, stats, skip_bad_lines):
            try:
                text, label, source, extra, messages = parse_prompt(record, where, keys, enable_thinking,
                                                                    label_required, tools)
            except PromptError as err:
                stats.reject(err, skip_bad_lines)
                continue
            tokens = tuple(tokenizer.backend.encode(text, add_special_tokens=False).ids)
            if len(tokens) > max_prompt_length:
                raise PromptError(f"{where}: the prompt is {len(tokens)} tokens, over the maximum prompt length "
                                  f"{max_prompt_length} (MP_GRPO_MAX_PROMPT_LENGTH)")
            prompts.append(Prompt(where, text, tokens, label, source, extra, messages))
    if not prompts:
        raise PromptError(f"{', '.join(map(str, paths))}: no prompts")
    if stats.skipped:
        print(f"{', '.join(map(str, paths))}: skipped {stats.skipped} bad records (--skip-bad-lines), e.g. "
              f"{stats.skipped_examples[0]}", flush=True)
    return prompts


def read_prompt_files(config, settings, tokenizer, label_required: bool = True,
                      tools: tuple[dict, ...] = ()) -> tuple[list[Prompt], list[Prompt]]:
    """A run's training and validation prompts (``config``: TrainConfig, ``settings``: GrpoSettings;
    typed in words, as rl/config.py imports this module); ``label_required``: the reward's; ``tools``:
    the schemas of --tools."""
    def read(paths):
        return read_prompts(paths, tokenizer, settings.max_prompt_length, settings.enable_thinking,
                            settings.prompt_keys(), settings.skip_bad_lines, label_required, tools)

    return read(config.data_path), read(config.valid_data_path) if config.valid_data_path else []
