"""Multi-turn tool rollouts: calls parsed and run in the tools' own process, tool turns inserted exactly as the
Qwen3 template renders them, only the model's tokens trained; errors become tool-turn text, never a crash.

The engine here plays back set assistant turns (its sampling is the generator's, tested on its own); the
tools are real functions in their real process, and the expected text is transformers' own template."""

from pathlib import Path

import pytest

from megatron_patch.data.chat import Conversation, Message, generation_prompt
from megatron_patch.models.generation import Completion
from megatron_patch.rl.tool_rollout import tool_rollout
from megatron_patch.rl.tools import Tools, parse_tool_calls, tool_schemas
from tests.helpers import TOOL_FUNCTIONS

CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
CALL_WEATHER = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "tools.py"
    path.write_text(TOOL_FUNCTIONS)
    tools = Tools(f"{path}:add,weather", timeout=2)
    yield tools
    tools.close()


def played_back(tokenizer, turns_by_sequence: list[list[str]], calls: list):
    """An engine that answers round r of sequence i with turns_by_sequence[i][r] (then <|im_end|>)."""
    def generate_turn(indices, contexts, budget, turn):
        calls.append((list(indices), [list(c) for c in contexts], budget))
        made = []
        for index in indices:
            text = turns_by_sequence[index][sum(index in done for done, _, _ in calls[:-1])]
            tokens = tokenizer.backend.encode(text, add_special_tokens=False).ids + [tokenizer.im_end]
            stopped = len(tokens) <= budget
            made.append(Completion(tokens[:budget], [-0.5] * min(len(tokens), budget), stopped))
        return made
    return generate_turn


def test_a_tool_turn_is_inserted_as_the_template_renders_it_and_only_the_models_tokens_are_trained(
        tokenizer, hf_tokenizer, tools):
    prompt_messages = [Message("user", "Add 2 and 3, then tell me the weather in Paris.")]
    prompt = tokenizer.backend.encode(generation_prompt(Conversation(prompt_messages, tools.schemas)),
                                      add_special_tokens=False).ids
    turns = [f"I will add.\n{CALL_ADD}", f"Now the weather.\n{CALL_ADD}\n{CALL_WEATHER}", "5, and clear."]
    calls = []
    (trajectory,) = tool_rollout(played_back(tokenizer, [turns], calls), [prompt], 512, tools, tokenizer,
                                 tokenizer.im_end, max_turns=5)
    assert trajectory.stopped and trajectory.tool_calls == 3 and trajectory.tool_errors == 0
    # The whole trajectory is what the template renders for the conversation the model had, up to its
    # last turn's opening (add_generation_prompt), then that turn as generated.
    conversation = [{"role": "user", "content": prompt_messages[0].content},
                    {"role": "assistant", "content": turns[0]}, {"role": "tool", "content": "5"},
                    {"role": "assistant", "content": turns[1]}, {"role": "tool", "content": "5"},
                    {"role": "tool", "content": '{"city": "Paris", "sky": "clear"}'}]
    expected = hf_tokenizer.apply_chat_template(conversation, tools=list(tools.schemas), tokenize=False,
                                                add_generation_prompt=True) + turns[2] + "<|im_end|>"
    assert tokenizer.backend.decode(prompt + trajectory.tokens, skip_special_tokens=False) == expected
    # Trained: exactly the model's turns (each with its <|im_end|>); inserted: everything else.
    model_text = [tokenizer.backend.decode([t for t, m in zip(trajectory.tokens, trajectory.model_mask) if m],
                                           skip_special_tokens=False)]
    assert model_text == ["".join(turn + "<|im_end|>" for turn in turns)]
    assert [lp for lp, m in zip(trajectory.log_probs, trajectory.model_mask) if not m] == \
        [0.0] * (len(trajectory.tokens) - sum(trajectory.model_mask))
    assert trajectory.turns == [{"role": "assistant", "content": turns[0]}, {"role": "tool", "content": "5"},
                                {"role": "assistant", "content": turns[1]}, {"role": "tool", "content": "5"},
                                {"role": "tool", "content": '{"city": "Paris", "sky": "clear"}'},
                                {"role": "assistant", "content": turns[2]}]
    # Each round's prompt is the trajectory so far; the budget shrinks by what the rounds used.
    assert [len(context) for _, (context,), _ in calls] == [len(prompt), *(
        len(prompt) + len(trajectory.tokens[:end]) for end in _round_ends(trajectory))]
    assert calls[0][2] == 512 and calls[1][2] < 512


def _round_ends(trajectory):
    """Where each round after the first began: after each inserted run of tokens."""
    ends = []
    for position in range(1, len(trajectory.model_mask)):
        if trajectory.model_mask[position] and not trajectory.model_mask[position - 1]:
            ends.append(position)
    return ends


@pytest.mark.parametrize("turn, error", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 2\n</tool_call>', "Error: the tool call is not valid JSON"),
    ('<tool_call>\n{"name": "subtract", "arguments": {}}\n</tool_call>', "Error: unknown tool 'subtract'"),
    ('<tool_call>\n{"name": "add", "arguments": {"c": 1}}\n</tool_call>',
     "Error: tool add raised TypeError: add() got an unexpected keyword argument 'c'"),
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "nowhere"}}\n</tool_call>',
     "Error: tool weather raised ValueError: no such city"),
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "slow"}}\n</tool_call>',
     "did not return within 2 s calling weather on p.jsonl:1 (sample 1)"),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', 'Error: a tool call is {"name": <function-name>'),
])
def test_a_bad_call_becomes_an_error_in_the_tool_turn_and_the_rollout_goes_on(turn, error, tokenizer, tools):
    calls = []
    (trajectory,) = tool_rollout(played_back(tokenizer, [[turn, "Sorry."]], calls), [[1, 2, 3]], 512, tools,
                                 tokenizer, tokenizer.im_end, max_turns=3, where=lambda i: "p.jsonl:1 (sample 1)")
    assert trajectory.tool_calls == trajectory.tool_errors == 1 and trajectory.stopped
    assert trajectory.turns[1]["role"] == "tool" and error in trajectory.turns[1]["content"]
    assert trajectory.turns[-1] == {"role": "assistant", "content": "Sorry."}
    assert tools.run(parse_tool_calls(CALL_ADD)[0], "after")[0] == "5"  # the tools' process still serves


def test_the_turn_and_length_limits_end_a_trajectory(tokenizer, tools):
    calls = []
    (limited,) = tool_rollout(played_back(tokenizer, [[CALL_ADD] * 5], calls), [[1]], 512, tools, tokenizer,
                              tokenizer.im_end, max_turns=2)
    assert len([t for t in limited.turns if t["role"] == "assistant"]) == 2 and limited.tool_calls == 1
    (short,) = tool_rollout(played_back(tokenizer, [[CALL_ADD] * 5], []), [[1]], 40, tools, tokenizer,
                            tokenizer.im_end, max_turns=5)
    assert len(short.tokens) <= 40 and not short.stopped  # no room for the results and a reply


def test_tools_without_a_docstring_or_file_are_refused_in_one_line(tmp_path):
    from megatron_patch.rl.tools import ToolError

    (tmp_path / "bare.py").write_text("def f(x):\n    return x\n")
    with pytest.raises(ToolError, match=r"bare.py:f.*f: no JSON schema from its signature and docstring"):
        tool_schemas(f"{tmp_path / 'bare.py'}:f")
    with pytest.raises(ToolError, match="missing.py not found"):
        tool_schemas(f"{tmp_path / 'missing.py'}:f")
    assert Path(tmp_path / "bare.py").is_file() and tool_schemas(None) == ()
