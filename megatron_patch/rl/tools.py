"""``--tools PATH.py:fn1,fn2``: the user's tool functions for multi-turn GRPO, in a process of their own.

Tools are plain Python functions with type hints and Google-style docstrings, the form transformers' chat
templates take as ``tools=[...]``: their JSON schemas (``transformers.utils.get_json_schema``) go into the
prompt's system turn, rendered by the kit's Qwen3 template (``data/chat.py``). The functions are imported
and called in a child process (``rl/child_process.py``), so a tool that exits, crashes or hangs cannot take
the job with it.

A call the model makes is text: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. Whatever is
wrong with one (bad JSON, an unknown tool, wrong arguments, a tool that raises, exits or runs past
``--tool-timeout``) becomes an error text in the tool turn, which the model sees and learns from, and is
counted in ``tool_errors``: never a crash. A tool's result is its return value as text (a string as it is,
anything else as JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from megatron_patch.errors import InputError
from megatron_patch.rl.child_process import ChildProcess, failure_text, serve
from megatron_patch.rl.user_code import user_functions

DEFAULT_TOOL_TIMEOUT = 60.0
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class ToolError(InputError):
    """Tools that cannot be loaded (a missing file or function, no docstring for the schema)."""


class _ToolProcessFailure(InputError):
    """The tools' process ended or ran past the timeout during a call (turned into the call's error text)."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def parse_tool_calls(text: str) -> list[ToolCall | str]:
    """The calls in one assistant turn, in order; an invalid one as its error text."""
    calls: list[ToolCall | str] = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(f"Error: the tool call is not valid JSON ({err.msg} at character {err.pos})")
            continue
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            calls.append('Error: a tool call is {"name": <function-name>, "arguments": <args-json-object>}')
            continue
        calls.append(ToolCall(call["name"], arguments))
    return calls


class Tools:
    """The user's functions in a child process: ``schemas`` for the prompt, ``run`` for each call."""

    def __init__(self, spec: str, timeout: float = DEFAULT_TOOL_TIMEOUT):
        self.spec, self.timeout = spec, timeout
        self.process = self._start()
        self.schemas: tuple[dict, ...] = tuple(self.process.hello["schemas"])
        self.names = tuple(schema["function"]["name"] for schema in self.schemas)

    def _start(self) -> ChildProcess:
        try:
            return ChildProcess("megatron_patch.rl.tools", [self.spec], f"tools {self.spec}", self.timeout,
                                "--tool-timeout / MP_GRPO_TOOL_TIMEOUT", _ToolProcessFailure)
        except _ToolProcessFailure as err:
            raise ToolError(str(err)) from None

    def run(self, call: ToolCall | str, where: str) -> tuple[str, bool]:
        """(the tool turn's text, whether it is an error) of one call."""
        if isinstance(call, str):
            return call, True
        try:
            answer = self.process.ask((call.name, call.arguments), f"calling {call.name} on {where}")
        except _ToolProcessFailure as err:  # the process is gone (killed for the timeout, or ended): a new one
            self.process.close()
            self.process = self._start()
            return f"Error: {err}", True
        return answer["text"], answer["is_error"]

    def close(self) -> None:
        self.process.close()


def tool_schemas(spec: str | None, timeout: float = DEFAULT_TOOL_TIMEOUT) -> tuple[dict, ...]:
    """The schemas of ``--tools`` (loaded in their own process, then stopped); () without tools."""
    if not spec:
        return ()
    tools = Tools(spec, timeout)
    tools.close()
    return tools.schemas


def _load(spec: str) -> tuple[dict, dict]:
    """The functions ``PATH.py:fn1,fn2`` names, and their schemas."""
    from transformers.utils import get_json_schema

    functions = user_functions(spec, f"--tools {spec}", ToolError, form="PATH.py:FUNCTION[,FUNCTION...]")
    schemas = []
    for name, function in functions.items():
        try:
            schemas.append(get_json_schema(function))
        except Exception as err:  # noqa: BLE001 - transformers says what the docstring or hints lack
            raise ToolError(f"--tools {spec}: {name}: no JSON schema from its signature and docstring "
                            f"({type(err).__name__}: {err})") from None
    return functions, {"schemas": schemas}


def _call(functions: dict, request: tuple) -> dict:
    name, arguments = request
    if name not in functions:
        return {"text": f"Error: unknown tool {name!r}; the tools are {', '.join(functions)}", "is_error": True}
    try:
        result = functions[name](**arguments)
    except BaseException as err:  # noqa: BLE001 - the model sees what went wrong, the job goes on
        return {"text": "Error: " + failure_text(f"tool {name}", err, "").rstrip(), "is_error": True}
    if isinstance(result, str):
        return {"text": result, "is_error": False}
    try:
        return {"text": json.dumps(result, ensure_ascii=False), "is_error": False}
    except (TypeError, ValueError):
        return {"text": str(result), "is_error": False}


def _failure(spec: str, err: BaseException, request: tuple | None) -> str:
    if isinstance(err, ToolError):
        return str(err)
    return failure_text(f"tools {spec}", err, "while its file was imported")


if __name__ == "__main__":
    import os
    import sys

    spec = sys.argv[2]
    serve(lambda: _load(spec), _call, lambda err, request: _failure(spec, err, request))
    os._exit(0)  # whatever threads the user's file started
