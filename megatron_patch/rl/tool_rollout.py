"""Multi-turn rollouts with tool calls (``--tools``): generate a turn, run its calls, insert the tool turn, go on.

Each round generates the next assistant turn of every sequence still going (to the end of the turn, or the
length limit). A turn that ended with ``<|im_end|>`` and holds ``<tool_call>`` blocks gets them run
(``rl/tools.py``) and the tool turn inserted exactly as the Qwen3 template renders it, followed by the
opening of the assistant's next turn; the sequence then goes on in the next round, up to ``max_turns``
assistant turns or ``--max-response-length`` tokens after the prompt (the model's and the inserted ones
together, so a trajectory always fits ``--seq-length``).

What is trained is the model's own tokens: ``model_mask`` is 0 on every inserted token, and the loss, the
importance ratios, the KL and the rollout-mismatch metrics all read the mask. Each round's prompt is the
whole trajectory so far, prefilled again (the generator's samples of one prompt share that prefill; a
KV cache kept across rounds would save it, and is not done yet). Each sequence keeps its own sampling
generator across rounds, so a trajectory does not depend on the others or on the layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_patch.models.generation import Completion
from megatron_patch.rl.tools import Tools, parse_tool_calls


@dataclass
class Trajectory:
    """What follows one prompt: the model's turns and the inserted tool turns, token by token."""

    tokens: list[int] = field(default_factory=list)
    model_mask: list[int] = field(default_factory=list)  # 1 on the model's tokens, 0 on inserted ones
    log_probs: list[float] = field(default_factory=list)  # the rollout's, 0 on inserted tokens
    stopped: bool = False  # its last turn ended with a stop token (else the length limit cut it)
    routing: torch.Tensor | None = None  # the last round's: every input of the whole trajectory
    turns: list[dict] = field(default_factory=list)  # {"role": "assistant"|"tool", "content"} after the prompt
    tool_calls: int = 0
    tool_errors: int = 0

    def add(self, tokens: list[int], log_probs: list[float] | None = None) -> None:
        self.tokens += tokens
        self.model_mask += [0 if log_probs is None else 1] * len(tokens)
        self.log_probs += [0.0] * len(tokens) if log_probs is None else log_probs


def tool_turn_text(results: list[str], enable_thinking: bool) -> str:
    """What the template renders after an assistant turn's ``<|im_end|>`` for its tools' results, up to the
    opening of the assistant's next turn (the generation prompt)."""
    responses = "".join(f"\n<tool_response>\n{result}\n</tool_response>" for result in results)
    return ("\n<|im_start|>user" + responses + "<|im_end|>\n<|im_start|>assistant\n"
            + ("" if enable_thinking else "<think>\n\n</think>\n\n"))


# (sequence indices, their whole contexts so far, the round's token budget, the round) -> their completions
GenerateTurn = Callable[[list[int], list[list[int]], int, int], list[Completion]]


def tool_rollout(generate_turn: GenerateTurn, prompts: list[list[int]], max_tokens: int, tools: Tools, tokenizer,
                 end_of_turn: int, max_turns: int, enable_thinking: bool = True,
                 where: Callable[[int], str] = str,
                 anyone_going: Callable[[bool], bool] = bool) -> list[Trajectory]:
    """Every prompt's trajectory. ``generate_turn`` generates one round for the sequences named (every process
    of the job calls it each round, with or without sequences of its own); ``anyone_going(mine)``: whether any
    process still has a sequence going (a collective; ``bool`` in one process); ``where(index)`` names a
    sequence in tool errors; ``end_of_turn``: ``<|im_end|>``'s id."""
    trajectories = [Trajectory() for _ in prompts]
    going = list(range(len(prompts)))
    for turn in range(max_turns):
        budgets = {index: max_tokens - len(trajectories[index].tokens) for index in going}
        going = [index for index in going if budgets[index] > 0]
        if not anyone_going(bool(going)):
            break
        completions = generate_turn(going, [prompts[i] + trajectories[i].tokens for i in going],
                                    max(budgets.values(), default=1), turn)
        next_round = []
        for index, completion in zip(going, completions):
            trajectory, budget = trajectories[index], budgets[index]
            tokens, log_probs = completion.tokens[:budget], completion.log_probs[:budget]
            trajectory.add(tokens, log_probs)
            trajectory.routing = completion.routing
            trajectory.stopped = completion.stopped and len(completion.tokens) <= budget
            ended = trajectory.stopped and tokens[-1] == end_of_turn
            text = tokenizer.backend.decode(tokens[:-1] if trajectory.stopped else tokens, skip_special_tokens=False)
            trajectory.turns.append({"role": "assistant", "content": text})
            calls = parse_tool_calls(text) if ended and turn < max_turns - 1 else []
            if not calls:
                continue
            results = []
            for call in calls:
                result, is_error = tools.run(call, where(index))
                results.append(result)
                trajectory.tool_calls += 1
                trajectory.tool_errors += is_error
            inserted = tokenizer.backend.encode(tool_turn_text(results, enable_thinking),
                                                add_special_tokens=False).ids
            if len(trajectory.tokens) + len(inserted) >= max_tokens:
                trajectory.stopped = False  # no room for the results and a reply: the length limit ends it
                continue
            trajectory.add(inserted)
            trajectory.turns += [{"role": "tool", "content": result} for result in results]
            next_round.append(index)
        going = next_round
    return trajectories
