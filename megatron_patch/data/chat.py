"""SFT conversations: Alpaca / ShareGPT / OpenAI-messages records -> Qwen3 chat text -> token ids and loss mask.

Rendering follows the Qwen3 chat template (the one in Qwen3's tokenizer_config.json) exactly:
ChatML turns; an assistant turn after the last user query carries a ``<think>`` block (the
final turn always, even when empty); earlier assistant turns drop their reasoning; tool
results render as user turns wrapped in ``<tool_response>``; a conversation's tools (OpenAI function
schemas, the HF chat convention's ``tools``) go into the system turn, and an assistant's
``tool_calls`` follow its content as ``<tool_call>`` blocks. Tests compare the result with the
tokenizer's own template (transformers' ``apply_chat_template``, tools included), token for token.

What is trained: each assistant turn's content, its tool calls and its ``<|im_end|>`` (the role
header and the newline after ``<|im_end|>`` are prompt); tool results never are. Reasoning that
the data provides is trained with the content. An empty think block is prompt, not target: that
is what Qwen3 puts in the prompt in non-thinking mode. With ``enable_thinking=False`` reasoning is
dropped and every think block is empty (training the non-thinking mode).

The template renders from the whole conversation (earlier turns lose their reasoning, the last
turn gains a think block), so masks cannot come from rendering prefixes; they come from
character spans of the one rendered text, mapped to tokens through the tokenizer's offsets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from megatron_patch.errors import InputError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}


class SampleError(InputError):
    """A record that is not a usable conversation; the message names the problem."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    reasoning: str | None = None
    tool_calls: tuple[dict, ...] = ()  # an assistant's calls: {"name", "arguments": dict or JSON text}


class Conversation(list):
    """A conversation's messages, and the tools (function schemas) its system turn offers the model."""

    def __init__(self, messages=(), tools=()):
        super().__init__(messages)
        self.tools = tuple(tools)


# The Qwen3 template's system text around the tool schemas.
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise SampleError(f"unknown record format (keys {sorted(record)[:6]}); "
                      "expected messages, conversations or instruction/output")


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise SampleError(f"{what} must be a string, got {type(value).__name__}")
    return value


def messages_from_record(record: dict, fmt: str = "auto") -> Conversation:
    """The conversation of one JSON record, in Alpaca, ShareGPT or OpenAI-messages form (with its ``tools``)."""
    if not isinstance(record, dict):
        raise SampleError(f"a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "alpaca":
        messages = _alpaca(record)
    elif fmt == "sharegpt":
        messages = _sharegpt(record)
    elif fmt == "messages":
        messages = _openai(record)
    else:
        raise SampleError(f"unknown format {fmt!r}")
    _validate(messages)
    return Conversation(messages, tools_of(record.get("tools")))


def tools_of(value) -> tuple[dict, ...]:
    """A record's ``tools``: a list of function schemas (``{"type": "function", "function": {...}}``)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise SampleError("'tools' must be a list of function schemas (JSON objects)")
    return tuple(value)


def _tool_calls(value, where: str) -> tuple[dict, ...]:
    """An assistant turn's ``tool_calls`` (OpenAI's ``{"function": {"name", "arguments"}}`` or the bare
    ``{"name", "arguments"}``), as ``{"name", "arguments"}`` with arguments a dict or JSON text."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SampleError(f"{where}.tool_calls must be a list")
    calls = []
    for index, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), (str, dict)):
            raise SampleError(f"{where}.tool_calls[{index}] needs a string name and arguments (an object or JSON text)")
        calls.append({"name": function["name"], "arguments": function["arguments"]})
    return tuple(calls)


def _alpaca(record: dict) -> list[Message]:
    for key in ("instruction", "output"):
        if key not in record:
            raise SampleError(f"alpaca record without {key!r}")
    messages = []
    if record.get("system"):
        messages.append(Message("system", _text(record["system"], "system")))
    for pair in record.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise SampleError("alpaca history entries must be [instruction, output] pairs")
        messages += [Message("user", _text(pair[0], "history")), Message("assistant", _text(pair[1], "history"))]
    prompt = _text(record["instruction"], "instruction")
    if record.get("input"):
        prompt = f"{prompt}\n{_text(record['input'], 'input')}"
    messages += [Message("user", prompt), Message("assistant", _text(record["output"], "output"))]
    return messages


def _sharegpt(record: dict) -> list[Message]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise SampleError("'conversations' must be a list")
    messages = [Message("system", _text(record["system"], "system"))] if record.get("system") else []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(f"conversations[{index}] needs 'from' and 'value'")
        speaker = turn["from"]
        if speaker not in SHAREGPT_ROLES:
            raise SampleError(f"conversations[{index}]: unknown role {speaker!r} (known: {', '.join(SHAREGPT_ROLES)})")
        value = _text(turn["value"], f"conversations[{index}].value")
        if speaker == "function_call":
            value = f"<tool_call>\n{value}\n</tool_call>"
        messages.append(Message(SHAREGPT_ROLES[speaker], value))
    return messages


def _openai(record: dict) -> list[Message]:
    turns = record["messages"]
    if not isinstance(turns, list):
        raise SampleError("'messages' must be a list")
    messages = []
    for index, turn in enumerate(turns):
        calls = _tool_calls(turn.get("tool_calls"), f"messages[{index}]") if isinstance(turn, dict) else ()
        if not isinstance(turn, dict) or "role" not in turn or ("content" not in turn and not calls):
            raise SampleError(f"messages[{index}] needs 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise SampleError(f"messages[{index}]: unknown role {turn['role']!r} (known: {', '.join(ROLES)})")
        if calls and turn["role"] != "assistant":
            raise SampleError(f"messages[{index}]: only an assistant turn makes tool calls")
        reasoning = turn.get("reasoning_content")
        content = turn.get("content")
        messages.append(Message(
            turn["role"], "" if content is None and calls else _text(content, f"messages[{index}].content"),
            None if reasoning is None else _text(reasoning, f"messages[{index}].reasoning_content"), calls,
        ))
    return messages


def _validate(messages: list[Message]) -> None:
    if not messages:
        raise SampleError("empty conversation")
    if any(m.role == "system" for m in messages[1:]):
        raise SampleError("a system message may only come first")
    if not any(m.role == "assistant" for m in messages):
        raise SampleError("no assistant turn: nothing to train on")


def _split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, content) the way the Qwen3 template reads an assistant message."""
    content = message.content
    if message.reasoning is not None:
        return message.reasoning, content
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


def _is_tool_response(message: Message) -> bool:
    text = message.content.strip()
    return text.startswith("<tool_response>") and text.endswith("</tool_response>")


def render(
    messages: list[Message], enable_thinking: bool = True, last_turn_only: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The Qwen3 chat text of a conversation and the character spans that are training targets."""
    last_query = max(
        (i for i, m in enumerate(messages) if m.role == "user" and not _is_tool_response(m)), default=-1
    )
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    position = 0
    tools = getattr(messages, "tools", ())

    def emit(text: str, trained: bool = False) -> None:
        nonlocal position
        if trained and text:
            spans.append((position, position + len(text)))
        parts.append(text)
        position += len(text)

    if tools:  # the system turn offers them, after the conversation's own system text
        system = messages[0].content + "\n\n" if messages and messages[0].role == "system" else ""
        schemas = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        emit(f"<|im_start|>system\n{system}{TOOLS_HEADER}{schemas}{TOOLS_FOOTER}<|im_end|>\n")
    for index, message in enumerate(messages):
        if message.role == "system" and tools:
            continue  # rendered above, with the tools
        if message.role in ("system", "user"):
            emit(f"<|im_start|>{message.role}\n{message.content}<|im_end|>\n")
        elif message.role == "tool":
            first = index == 0 or messages[index - 1].role != "tool"
            last = index == len(messages) - 1 or messages[index + 1].role != "tool"
            emit(("<|im_start|>user" if first else "") + f"\n<tool_response>\n{message.content}\n</tool_response>")
            if last:
                emit("<|im_end|>\n")
        else:
            trained = not last_turn_only or index == last_assistant
            reasoning, content = _split_reasoning(message)
            if not enable_thinking:
                reasoning = ""
            emit("<|im_start|>assistant\n")
            calls = tool_call_text(message.tool_calls, after_content=bool(content))
            if index > last_query and (index == len(messages) - 1 or reasoning):
                think = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                # An empty think block is what the non-thinking prompt contains: not a target.
                emit(think, trained=trained and bool(reasoning.strip("\n")))
                content = content.lstrip("\n")
            emit(content + calls + "<|im_end|>", trained=trained)
            emit("\n")
    return "".join(parts), _merge(spans)


def tool_call_text(calls, after_content: bool) -> str:
    """An assistant's tool calls as the Qwen3 template writes them after its content."""
    text = ""
    for index, call in enumerate(calls):
        if index or after_content:
            text += "\n"
        arguments = call["arguments"]
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        text += f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n</tool_call>'
    return text


def prompt_messages(turns) -> list[Message]:
    """The turns (OpenAI-messages form) of a prompt the model is to answer: no closing assistant turn."""
    messages = _openai({"messages": turns})
    if not messages:
        raise SampleError("empty conversation")
    if any(m.role == "system" for m in messages[1:]):
        raise SampleError("a system message may only come first")
    if messages[-1].role not in ("user", "tool"):
        raise SampleError("the last turn must be the user's (or a tool's) for the model to answer")
    return messages


def generation_prompt(messages: list[Message], enable_thinking: bool = True) -> str:
    """The chat text of ``messages`` with the assistant's turn opened: the template's
    ``add_generation_prompt``; without thinking, the empty think block Qwen3 puts there."""
    text, _ = render(messages, enable_thinking)
    return text + "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _mask_from_offsets(spans: list[tuple[int, int]], offsets) -> list[int]:
    """1 for each token that starts inside a trained character span (a scan over every token)."""
    mask, span = [], 0
    for start, _ in offsets:
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        mask.append(int(span < len(spans) and spans[span][0] <= start))
    return mask


def tokenize_conversation(
    tokenizer, messages: list[Message], enable_thinking: bool = True, last_turn_only: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of the tokens that are targets."""
    return tokenize_conversations(tokenizer, [messages], enable_thinking, last_turn_only)[0]


def tokenize_conversations(
    tokenizer, conversations: list[list[Message]], enable_thinking: bool = True, last_turn_only: bool = False,
    as_arrays: bool = False,
):
    """``tokenize_conversation`` for many conversations with one batched tokenizer call.

    ``as_arrays`` gives (int32 ids, uint8 mask) numpy arrays instead of lists: cheaper to build,
    and cheap to send between processes (a buffer, not a pickled list of ints).
    """
    import numpy as np

    rendered = [render(messages, enable_thinking, last_turn_only) for messages in conversations]
    encodings = tokenizer.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    pairs = [(np.array(e.ids, dtype=np.int32), _mask(e, spans)) for e, (_, spans) in zip(encodings, rendered)]
    return pairs if as_arrays else [(ids.tolist(), mask.tolist()) for ids, mask in pairs]


def _mask(encoding, spans: list[tuple[int, int]]):
    """The uint8 target mask, located per span with the encoding's char-to-token map (a few calls, not a scan).

    Spans start right after a role header and end with <|im_end|>, so a token begins at each span
    start; where a character maps to no token the exact per-token scan is used instead.
    """
    import numpy as np

    mask = np.zeros(len(encoding), dtype=np.uint8)
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None or encoding.token_to_chars(first)[0] != start:
            return np.array(_mask_from_offsets(spans, encoding.offsets), dtype=np.uint8)
        mask[first : last + 1] = 1
    return mask
