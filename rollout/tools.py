"""Tools: Python functions the model calls by writing a tool call in its turn.

A tool is a plain function (or `async def`) with type hints and a Google-style docstring:

    def add(a: int, b: int) -> int:
        '''Adds two integers.

        Args:
            a: the first
            b: the second
        '''
        return a + b

Its JSON schema, `{"type": "function", "function": {"name", "description", "parameters"}}`, is
what transformers' `get_json_schema` derives from the hints and docstring: the shape that
`tokenizer.apply_chat_template(messages, tools=[...])` and OpenAI's API take. Tools are configured
by import or file path (`my_pkg.tools:add`), like reward functions.

Parsing. A parser turns the model's text into tool calls; parsers are registered by name
(`@register_parser("name")`, a name twice is an error) and share one signature,
`parse(text) -> ParsedTurn`. The default, "hermes", reads the Hermes/Qwen format
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one JSON object per block.

Execution. `ToolBox.run(text)` parses a turn and runs its calls side by side, each off the
caller's thread with `timeout_s` (rollout.calls); its Future resolves to one ToolResult per call,
in the order written, each with the `tool` message to append. Nothing a call does crashes the
rollout: a block that is not a call ("malformed"), a name no tool has ("unknown_tool"), arguments
the function does not take or of the wrong JSON type ("bad_arguments"), an exception
("raised") and no answer in time ("timeout") each become an error text for the model and a
counted kind (`tool_metrics`). Results longer than `max_result_chars` are cut, and say so.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from reward.api import load_object
from rollout.calls import Outcome, call_with_deadline

TOOL_ERROR_KINDS = ("malformed", "unknown_tool", "bad_arguments", "raised", "timeout")


class ToolError(ValueError):
    """A tool could not be loaded or described, or a parser name is unknown or taken."""


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None  # the call's id where the format carries one


@dataclass(frozen=True)
class Malformed:
    text: str  # the block as the model wrote it
    reason: str  # what is wrong with it, for the error message


@dataclass(frozen=True)
class ParsedTurn:
    calls: tuple[ToolCall | Malformed, ...]  # in the order written
    content: str  # the text outside the tool-call blocks


@dataclass(frozen=True)
class ToolResult:
    name: str  # the tool called ("" for a malformed block)
    content: str  # the tool's answer, or the error text the model reads
    error: str | None  # one of TOOL_ERROR_KINDS; None when the call returned
    seconds: float = 0.0
    call_id: str | None = None

    def message(self) -> dict[str, Any]:
        """The `tool` message to append to the conversation."""
        m: dict[str, Any] = {"role": "tool", "name": self.name, "content": self.content}
        if self.call_id is not None:
            m["tool_call_id"] = self.call_id
        return m


def tool_from_function(fn: Callable[..., Any], name: str | None = None) -> Tool:
    """A Tool whose schema transformers' get_json_schema derives from fn's type hints and docstring."""
    from transformers.utils import get_json_schema

    label = name or getattr(fn, "__name__", repr(fn))
    try:
        schema = get_json_schema(fn)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException
        raise ToolError(f"tool {label!r}: cannot derive its JSON schema ({e}); it needs a type hint for every "
                        f"argument and a docstring with an Args: section describing each") from e
    schema = {"type": "function", "function": {**schema["function"], "name": label}}
    return Tool(label, fn, schema)


def load_tool(spec: str) -> Tool:
    """`pkg.module:fn` or `path/to/file.py:fn` -> its Tool."""
    fn = load_object(spec, "tool", ToolError)
    if inspect.isclass(fn) or not callable(fn):
        raise ToolError(f"tool {spec!r} is a {type(fn).__name__}, not a function")
    return tool_from_function(fn)


# -- parsers ------------------------------------------------------------------------------------------

Parser = Callable[[str], ParsedTurn]
PARSERS: dict[str, Parser] = {}


def register_parser(name: str) -> Callable[[Parser], Parser]:
    def register(fn: Parser) -> Parser:
        if name in PARSERS:
            raise ToolError(f"tool-call parser {name!r} is already registered")
        PARSERS[name] = fn
        return fn
    return register


def get_parser(name: str) -> Parser:
    if name not in PARSERS:
        raise ToolError(f"unknown tool-call parser {name!r}; registered: {sorted(PARSERS)}")
    return PARSERS[name]


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@register_parser("hermes")
def parse_hermes(text: str) -> ParsedTurn:
    """`<tool_call>{"name": "f", "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3).

    "arguments" may also be a JSON string of an object (some models write it so) or left out ({}).
    A block never closed (the turn was cut) is malformed.
    """
    calls: list[ToolCall | Malformed] = []
    for match in _HERMES_BLOCK.finditer(text):
        body, block = match.group(1).strip(), match.group(0)
        if not block.endswith("</tool_call>"):
            calls.append(Malformed(block, "the <tool_call> block is not closed with </tool_call>"))
            continue
        calls.append(_call_from_json(body, block))
    return ParsedTurn(tuple(calls), _HERMES_BLOCK.sub("", text).strip())


def _call_from_json(body: str, block: str) -> ToolCall | Malformed:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return Malformed(block, f"its body is not JSON ({e.msg} at character {e.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return Malformed(block, 'it must be a JSON object {"name": "<tool>", "arguments": {...}}')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return Malformed(block, "its arguments are a string that is not a JSON object")
    if not isinstance(args, dict):
        return Malformed(block, f"its arguments are a JSON {type(args).__name__}, not an object")
    call_id = obj.get("id")
    return ToolCall(obj["name"], args, call_id if isinstance(call_id, str) else None)


# -- execution ----------------------------------------------------------------------------------------

class ToolBox:
    """The tools of a task, a parser and the limits: parses a model turn and runs its calls."""

    def __init__(self, tools: Sequence[Tool | Callable[..., Any]], parser: str = "hermes", timeout_s: float = 10.0,
                 max_result_chars: int = 4000):
        built = [t if isinstance(t, Tool) else tool_from_function(t) for t in tools]
        names = [t.name for t in built]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ToolError(f"tool names {twice} are given twice")
        if not timeout_s > 0 or max_result_chars < 1:
            raise ToolError(f"tools.timeout_s must be > 0 and max_result_chars >= 1, not {timeout_s!r} and "
                            f"{max_result_chars!r}")
        self.tools = {t.name: t for t in built}
        self.parse = get_parser(parser)
        self.timeout_s = float(timeout_s)
        self.max_result_chars = max_result_chars

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """For `tokenizer.apply_chat_template(..., tools=toolbox.schemas)`."""
        return [t.schema for t in self.tools.values()]

    def run(self, text: str) -> Future:
        """-> Future[list[ToolResult]]: every call in `text`, run side by side. [] when it has none."""
        parsed = self.parse(text)
        pending: list[Future] = [self._start(c) for c in parsed.calls]
        results: Future = Future()
        results.set_running_or_notify_cancel()
        if not pending:
            results.set_result([])
            return results
        left = [len(pending)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:  # the calls finish on different threads
                left[0] -= 1
                last = left[0] == 0
            if last:
                results.set_result([f.result() for f in pending])

        for f in pending:
            f.add_done_callback(one_done)
        return results

    def _start(self, call: ToolCall | Malformed) -> Future:
        if isinstance(call, Malformed):
            return _done(ToolResult("", f"Error: could not read this tool call: {call.reason}. Write "
                                        f'<tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>.',
                                    "malformed"))
        tool = self.tools.get(call.name)
        if tool is None:
            return _done(ToolResult(call.name, f"Error: there is no tool named {call.name!r}; the tools are "
                                               f"{sorted(self.tools)}.", "unknown_tool", call_id=call.id))
        problem = _arguments_problem(tool, call.arguments)
        if problem is not None:
            return _done(ToolResult(call.name, f"Error: bad arguments for {call.name}: {problem}.", "bad_arguments",
                                    call_id=call.id))
        inner = call_with_deadline(functools.partial(tool.fn, **call.arguments), timeout_s=self.timeout_s,
                                   name=f"tool-{call.name}")
        out: Future = Future()
        out.set_running_or_notify_cancel()
        inner.add_done_callback(lambda f: out.set_result(self._result(call, f.result())))
        return out

    def _result(self, call: ToolCall, outcome: Outcome) -> ToolResult:
        if outcome.timed_out:
            return ToolResult(call.name, f"Error: {call.name} did not finish within {self.timeout_s:g} s.", "timeout",
                              outcome.seconds, call.id)
        if outcome.error is not None:
            e = outcome.error
            return ToolResult(call.name, f"Error: {call.name} raised {type(e).__name__}: {str(e)[:500]}", "raised",
                              outcome.seconds, call.id)
        return ToolResult(call.name, self._clip(_as_text(outcome.value)), None, outcome.seconds, call.id)

    def _clip(self, text: str) -> str:
        if len(text) <= self.max_result_chars:
            return text
        return text[: self.max_result_chars] + f"\n[... cut: {len(text) - self.max_result_chars} more characters]"


def tool_metrics(results: Sequence[ToolResult]) -> dict[str, float]:
    """`tools/calls` and `tools/errors/<kind>` (every kind, zeros too) over a batch's results."""
    metrics = {"tools/calls": float(len(results))}
    for kind in TOOL_ERROR_KINDS:
        metrics[f"tools/errors/{kind}"] = float(sum(r.error == kind for r in results))
    return metrics


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _arguments_problem(tool: Tool, arguments: dict[str, Any]) -> str | None:
    """What is wrong with the arguments for this tool (None: nothing): binding and top-level JSON types."""
    try:
        inspect.signature(tool.fn).bind(**arguments)
    except TypeError as e:
        return str(e)
    properties = tool.schema["function"].get("parameters", {}).get("properties", {})
    for key, value in arguments.items():
        spec = properties.get(key, {})
        if value is None and spec.get("nullable"):
            continue
        types = spec.get("type")
        types = [types] if isinstance(types, str) else types or []
        if types and not any(_JSON_TYPES.get(t, lambda v: True)(value) for t in types):
            return f"{key!r} must be of JSON type {' or '.join(types)}, not {json.dumps(value)[:80]}"
        if "enum" in spec and value not in spec["enum"]:
            return f"{key!r} must be one of {spec['enum']}, not {json.dumps(value)[:80]}"
    return None


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _done(result: ToolResult) -> Future:
    f: Future = Future()
    f.set_result(result)
    return f
