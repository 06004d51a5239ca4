"""Qwen3 chat rendering and SFT loss masks, checked against the real Qwen3 tokenizer and its own template."""

import pytest

from megatron_patch.data.chat import (
    Conversation,
    Message,
    SampleError,
    messages_from_record,
    render,
    tokenize_conversation,
)


def as_dicts(messages):
    out = []
    for m in messages:
        entry = {"role": m.role, "content": m.content}
        if m.reasoning is not None:
            entry["reasoning_content"] = m.reasoning
        if m.tool_calls:
            entry["tool_calls"] = [{"type": "function", "function": call} for call in m.tool_calls]
        out.append(entry)
    return out


WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Today's weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市 / city"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time now.",
                                          "parameters": {"type": "object", "properties": {}}}}

# The HF chat convention: tools beside the messages, assistant turns with tool_calls, tool turns.
TOOL_CONVERSATIONS = {
    "calls with tools": (Conversation([
        Message("system", "Be brief."), Message("user", "Weather in Paris and the time?"),
        Message("assistant", "", tool_calls=({"name": "weather", "arguments": {"city": "Paris"}},
                                             {"name": "clock", "arguments": "{}"})),
        Message("tool", '{"temp": 21}'), Message("tool", '"12:00"'),
        Message("assistant", "21 °C at noon.")], tools=(WEATHER, CLOCK))),
    "content then a call, no system": (Conversation([
        Message("user", "巴黎天气？"),
        Message("assistant", "Let me check.", reasoning="The user wants weather.",
                tool_calls=({"name": "weather", "arguments": {"city": "巴黎"}},)),
        Message("tool", "晴"), Message("assistant", "晴天。", reasoning="Sunny.")], tools=(WEATHER,))),
}


CONVERSATIONS = {
    "single-turn": [Message("user", "What is 2+2?"), Message("assistant", "4.")],
    "system": [Message("system", "你是助手"), Message("user", "你好"), Message("assistant", "你好！有什么可以帮你？")],
    "multi-turn": [
        Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
        Message("user", "Name a prime."), Message("assistant", "  7, as in\n\nseven."),
    ],
    "reasoning-last": [
        Message("user", "2*3?"), Message("assistant", "6", reasoning="Multiply 2 by 3.\nThat is 6."),
    ],
    "reasoning-in-content": [
        Message("user", "你好"), Message("assistant", "<think>\n想一想\n</think>\n\n你好！"),
        Message("user", "再见"), Message("assistant", "<think>\n告别\n</think>\n\n再见！"),
    ],
    "tools": [
        Message("user", "Weather in Paris?"),
        Message("assistant", '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        Message("tool", '{"temp": 21}'), Message("tool", '{"sky": "clear"}'),
        Message("assistant", "21 °C and clear."),
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_rendering_equals_the_tokenizers_template(name, tokenizer, hf_tokenizer):
    messages = CONVERSATIONS[name]
    text, _ = render(messages)
    assert text == hf_tokenizer.apply_chat_template(as_dicts(messages), tokenize=False)
    ids, mask = tokenize_conversation(tokenizer, messages)
    expected = hf_tokenizer.apply_chat_template(as_dicts(messages), tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert len(mask) == len(ids)


def trained_pieces(tokenizer, ids, mask):
    """Decoded runs of consecutive trained tokens."""
    pieces, run = [], []
    for token, flag in zip(ids, mask):
        if flag:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    if run:
        pieces.append(tokenizer.decode(run))
    return pieces


def test_mask_selects_exactly_the_assistant_turns(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, CONVERSATIONS["multi-turn"])
    assert trained_pieces(tokenizer, ids, mask) == ["Hello!<|im_end|>", "  7, as in\n\nseven.<|im_end|>"]
    ids, mask = tokenize_conversation(tokenizer, CONVERSATIONS["multi-turn"], last_turn_only=True)
    assert trained_pieces(tokenizer, ids, mask) == ["  7, as in\n\nseven.<|im_end|>"]


def test_reasoning_is_trained_and_empty_think_blocks_are_prompt(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, CONVERSATIONS["reasoning-last"])
    assert trained_pieces(tokenizer, ids, mask) == ["<think>\nMultiply 2 by 3.\nThat is 6.\n</think>\n\n6<|im_end|>"]
    # Earlier turns lose their reasoning (template rule); the final one keeps it.
    ids, mask = tokenize_conversation(tokenizer, CONVERSATIONS["reasoning-in-content"])
    assert trained_pieces(tokenizer, ids, mask) == ["你好！<|im_end|>", "<think>\n告别\n</think>\n\n再见！<|im_end|>"]
    # Plain data: the final turn's empty think block is rendered but not trained.
    ids, mask = tokenize_conversation(tokenizer, CONVERSATIONS["single-turn"])
    assert "<think>\n\n</think>\n\n" in tokenizer.decode(ids)
    assert trained_pieces(tokenizer, ids, mask) == ["4.<|im_end|>"]


def test_enable_thinking_false_drops_reasoning(tokenizer, hf_tokenizer):
    messages = CONVERSATIONS["reasoning-last"]
    ids, mask = tokenize_conversation(tokenizer, messages, enable_thinking=False)
    plain = [Message("user", "2*3?"), Message("assistant", "6")]
    assert ids == list(hf_tokenizer.apply_chat_template(as_dicts(plain), tokenize=True)["input_ids"])
    assert trained_pieces(tokenizer, ids, mask) == ["6<|im_end|>"]


def test_tool_turns_are_prompt(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, CONVERSATIONS["tools"])
    assert trained_pieces(tokenizer, ids, mask) == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "21 °C and clear.<|im_end|>",
    ]


def test_the_three_formats_give_the_same_conversation():
    expected = [Message("system", "S"), Message("user", "Q1"), Message("assistant", "A1"),
                Message("user", "Q2\nextra"), Message("assistant", "A2")]
    alpaca = {"system": "S", "history": [["Q1", "A1"]], "instruction": "Q2", "input": "extra", "output": "A2"}
    sharegpt = {"system": "S", "conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2\nextra"}, {"from": "gpt", "value": "A2"}]}
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2\nextra"},
                           {"role": "assistant", "content": "A2"}]}
    for record in (alpaca, sharegpt, openai):
        assert messages_from_record(record) == expected


@pytest.mark.parametrize(
    "record, message",
    [
        ({"conversations": [{"from": "narrator", "value": "x"}]}, "unknown role 'narrator'"),
        ({"messages": []}, "empty conversation"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"instruction": "x"}, "alpaca record without 'output'"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] needs 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "must be a string"),
        ({"text": "x"}, "unknown record format"),
    ],
)
def test_bad_records_are_named(record, message):
    with pytest.raises(SampleError, match=message):
        messages_from_record(record)


def test_tokenizer_facts(tokenizer):
    assert tokenizer.vocab_size == 151669
    assert (tokenizer.eod, tokenizer.pad, tokenizer.im_start, tokenizer.im_end) == (151643, 151643, 151644, 151645)


@pytest.mark.parametrize("name", list(TOOL_CONVERSATIONS))
def test_tool_conversations_render_as_the_tokenizers_template_with_tools(name, tokenizer, hf_tokenizer):
    conversation = TOOL_CONVERSATIONS[name]
    text, _ = render(conversation)
    expected = hf_tokenizer.apply_chat_template(as_dicts(conversation), tools=list(conversation.tools), tokenize=False)
    assert text == expected
    ids, _ = tokenize_conversation(tokenizer, conversation)
    assert ids == tokenizer.backend.encode(expected, add_special_tokens=False).ids


def test_tool_calls_are_trained_and_tool_results_and_schemas_are_not(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, TOOL_CONVERSATIONS["calls with tools"])
    assert trained_pieces(tokenizer, ids, mask) == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call><|im_end|>',
        "21 °C at noon.<|im_end|>",
    ]
    ids, mask = tokenize_conversation(tokenizer, TOOL_CONVERSATIONS["content then a call, no system"])
    assert trained_pieces(tokenizer, ids, mask) == [
        # After the last user query a turn keeps its reasoning (the template's multi-step tool rule).
        '<think>\nThe user wants weather.\n</think>\n\nLet me check.\n<tool_call>\n{"name": "weather", '
        '"arguments": {"city": "巴黎"}}\n</tool_call><|im_end|>',
        "<think>\nSunny.\n</think>\n\n晴天。<|im_end|>",
    ]


def test_a_messages_record_with_tools_and_tool_calls_reads_as_the_hf_convention():
    record = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 °C."}]}
    conversation = messages_from_record(record)
    assert conversation.tools == (WEATHER,)
    assert conversation[1] == Message("assistant", "", None, ({"name": "weather", "arguments": '{"city": "Paris"}'},))
    for bad, message in (({"tools": {"weather": 1}}, "'tools' must be a list of function schemas"),
                         ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, *record["messages"][1:]]},
                          None),
                         ({"messages": [record["messages"][0], {"role": "assistant", "tool_calls": [{"name": 3}]}]},
                          r"messages\[1\].tool_calls\[0\] needs a string name and arguments")):
        if message is None:
            messages_from_record({**record, **bad})  # an empty list of calls is no call
            continue
        with pytest.raises(SampleError, match=message):
            messages_from_record({**record, **bad})
