"""Reward functions: ``reward(prompt: str, response: str, label: str) -> float``.

Built in: ``gsm8k`` (strict) and ``gsm8k-flexible``, by verl's rules:
- strict: in the last 300 characters of the response, the last ``#### <number>`` (digits, ``-``,
  ``.`` and ``,``); commas and ``$`` removed; 1.0 when it equals the label as a string, else 0.0;
- flexible: the last number anywhere in those 300 characters (not "" or "."), as written, against
  the label.

A user's own: ``custom:PATH.py:FUNCTION``, in the kit's form ``FUNCTION(prompt, response, label)``
or in verl's, ``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` (told
apart by its parameter names, ``solution_str`` and ``ground_truth``, and called by keyword as verl
calls it). Either may return a number or a dict with ``score``; the dict's other numeric entries
are logged as ``reward_extra/KEY`` (their mean over the step). A missing file or function, or a
function that raises or returns no finite score, stops the run in one line naming it and the
sample; it never becomes a silent 0.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass

from megatron_patch.errors import InputError
from megatron_patch.rl.user_code import user_functions

TAIL_CHARACTERS = 300  # verl matches only the end of a response: the answer is there, and regexes stay fast
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")


class RewardError(InputError):
    """A reward that cannot be loaded or that failed on a sample; the message names both."""


def gsm8k_strict_answer(text: str) -> str | None:
    matches = _STRICT.findall(text[-TAIL_CHARACTERS:])
    return matches[-1].replace(",", "").replace("$", "") if matches else None


def gsm8k_flexible_answer(text: str) -> str | None:
    for number in reversed(_NUMBER.findall(text[-TAIL_CHARACTERS:])):
        if number not in ("", "."):
            return number
    return None


def gsm8k_strict(prompt: str, response: str, label: str) -> float:
    return 1.0 if gsm8k_strict_answer(response) == label else 0.0


def gsm8k_flexible(prompt: str, response: str, label: str) -> float:
    return 1.0 if gsm8k_flexible_answer(response) == label else 0.0


def ascii_letters(prompt: str, response: str, label: str | None = None) -> float:
    """The share of the response's characters that are ASCII letters: a task a tiny random model
    learns in minutes on CPU (make demo-rl). Random Qwen3 tokens score about 0.7."""
    return sum(c.isascii() and c.isalpha() for c in response) / len(response) if response else 0.0


BUILTIN_REWARDS: dict[str, Callable[[str, str, str], float]] = {
    "gsm8k": gsm8k_strict,
    "gsm8k-flexible": gsm8k_flexible,
    "letters": ascii_letters,
}


LABEL_FREE_BUILTINS = ("letters",)


@dataclass(frozen=True)
class Score:
    value: float
    extras: dict[str, float]  # a dict return's other numeric entries


def _is_number(value) -> bool:
    """A real number of any numeric type (NumPy's and torch's scalars included), not a bool."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # NumPy scalars, 0-d arrays and tensors
        value = value.item()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Reward:
    name: str  # as the user gave it
    function: Callable
    style: str = "kit"  # "kit": function(prompt, response, label); "verl": compute_score(...) by keyword
    takes_extra_info: bool = False  # verl style: whether to pass extra_info
    # The label: "needed" (a prompt without one is refused), "optional" (a default; passed when there is one)
    # or "none" (function(prompt, response): a format, length or judge reward needs no answer).
    label: str = "needed"

    @property
    def needs_label(self) -> bool:
        return self.label == "needed"

    def __call__(self, prompt: str, response: str, label, where: str = "a sample", data_source: str = "",
                 extra_info=None) -> Score:
        """The reward of one response; ``where`` names the sample in errors (prompt file:line, sample k)."""
        passes_label = self.label == "needed" or (self.label == "optional" and label is not None)
        try:
            if self.style == "verl":
                extra = {"extra_info": extra_info} if self.takes_extra_info else {}
                extra |= {"ground_truth": label} if passes_label else {}
                value = self.function(data_source=data_source, solution_str=response, **extra)
            else:
                value = self.function(prompt, response, *((label,) if passes_label else ()))
        except Exception as err:  # noqa: BLE001 - whatever a user's function raises, say which sample
            raise RewardError(f"reward {self.name} failed on {where}: {type(err).__name__}: {err}") from None
        extras = {}
        if isinstance(value, dict):
            extras = {str(k): float(v) for k, v in value.items() if k != "score" and _is_number(v)}
            if "score" not in value:
                raise RewardError(f"reward {self.name} returned a dict without \"score\" on {where} "
                                  f"(keys {sorted(value)[:5]})")
            value = value["score"]
        if not _is_number(value) or not math.isfinite(float(value)):
            raise RewardError(f"reward {self.name} returned {value!r} on {where}; expected a finite number")
        return Score(float(value), extras)


def _style(function) -> tuple[str, bool, str]:
    """(style, takes extra_info, label) of a user's function: ("verl", ...) for verl's compute_score signature,
    else ("kit", False, ...); the label as ``Reward.label`` reads it off the signature."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the kit's positional call
        return "kit", False, "needed"
    empty = inspect.Parameter.empty
    if {"solution_str", "ground_truth"} <= set(parameters):
        keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        label = "needed" if parameters["ground_truth"].default is empty else "optional"
        return "verl", "extra_info" in parameters or keywords, label
    positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in parameters.values()) or \
            (len(positional) >= 3 and positional[2].default is empty):
        return "kit", False, "needed"
    return "kit", False, "optional" if len(positional) >= 3 else "none"


def load_reward(spec: str) -> Reward:
    """A built-in name or ``custom:PATH.py:FUNCTION`` (the user's own file, imported as given)."""
    if spec in BUILTIN_REWARDS:
        return Reward(spec, BUILTIN_REWARDS[spec], label="optional" if spec in LABEL_FREE_BUILTINS else "needed")
    if not spec.startswith("custom:"):
        raise RewardError(f"reward {spec!r}: expected {', '.join(BUILTIN_REWARDS)} or custom:PATH.py:FUNCTION")
    (function,) = user_functions(spec.removeprefix("custom:"), f"reward {spec}", RewardError,
                                 form="custom:PATH.py:FUNCTION").values()
    return Reward(spec, function, *_style(function))
