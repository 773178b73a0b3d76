"""Tools: schemas from hints and docstrings (as the chat template's tools= takes them), the Hermes/Qwen parser
and pluggable parsers, and every failure of a call turned into an error text and a counted kind."""

from __future__ import annotations

import asyncio
import time

import pytest
from transformers import AutoTokenizer

from rollout.tools import (
    PARSERS,
    TOOL_ERROR_KINDS,
    Malformed,
    ParsedTurn,
    ToolBox,
    ToolCall,
    ToolError,
    get_parser,
    load_tool,
    parse_hermes,
    register_parser,
    tool_from_function,
    tool_metrics,
)


def add(a: int, b: int = 0) -> int:
    """Adds two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def divide(x: float, y: float) -> float:
    """Divides x by y.

    Args:
        x: the dividend
        y: the divisor
    """
    return x / y


def nap(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "awake"


async def shout(text: str) -> str:
    """Upper-cases text, after a pause.

    Args:
        text: what to shout
    """
    await asyncio.sleep(0.01)
    return text.upper()


def listing(n: int) -> list:
    """A list of n numbers.

    Args:
        n: how many
    """
    return list(range(n))


def test_the_schema_comes_from_hints_and_docstring():
    assert tool_from_function(add).schema == {"type": "function", "function": {
        "name": "add", "description": "Adds two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "the first number"},
                                                         "b": {"type": "integer", "description": "the second number"}},
                       "required": ["a"]},
        "return": {"type": "integer"}}}
    with pytest.raises(ToolError, match=r"tool 'nodoc': cannot derive its JSON schema"):
        tool_from_function(lambda x: x, name="nodoc")


def test_schemas_render_in_a_chat_template(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = ("{% for t in tools %}[tool {{ t.function.name }}: {{ t.function.parameters | tojson }}]"
                               "{% endfor %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=ToolBox([add, shout]).schemas,
                                         tokenize=False)
    assert text.startswith('[tool add: {"type": "object"') and "[tool shout:" in text and text.endswith("user: hi\n")


def test_hermes_blocks_are_read_in_order_with_the_text_around_them():
    text = ('Let me compute.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
            '<tool_call>{"name": "divide", "arguments": "{\\"x\\": 1, \\"y\\": 4}"}</tool_call> and '
            '<tool_call>{"name": "nap"}</tool_call>')
    parsed = parse_hermes(text)
    assert parsed.calls == (ToolCall("add", {"a": 1, "b": 2}), ToolCall("divide", {"x": 1, "y": 4}),
                            ToolCall("nap", {}))
    assert parsed.content == "Let me compute. and"
    assert parse_hermes("no calls here") == ParsedTurn((), "no calls here")


@pytest.mark.parametrize("text, reason", [
    ('<tool_call>{"name": "add", "arguments": {"a": 1}', "not closed"),
    ("<tool_call>{name: add}</tool_call>", "not JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', "must be a JSON object"),
    ('<tool_call>["add"]</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "arguments are a JSON list"),
])
def test_malformed_blocks_say_what_is_wrong(text, reason):
    (call,) = parse_hermes(text).calls
    assert isinstance(call, Malformed) and reason in call.reason


def test_every_failure_becomes_an_error_text_and_a_counted_kind():
    box = ToolBox([add, divide, nap, shout], timeout_s=0.3)
    calls = [('{"name": "add", "arguments": {"a": 2, "b": 3}}', None, "5"),
             ('{"name": "shout", "arguments": {"text": "hey"}}', None, "HEY"),
             ('{"name": "multiply", "arguments": {"a": 2}}', "unknown_tool", "there is no tool named 'multiply'"),
             ('{"name": "add", "arguments": {"b": 3}}', "bad_arguments", "missing a required argument: 'a'"),
             ('{"name": "add", "arguments": {"a": 1, "c": 3}}', "bad_arguments", "unexpected keyword argument 'c'"),
             ('{"name": "add", "arguments": {"a": "two"}}', "bad_arguments", "'a' must be of JSON type integer"),
             ('{"name": "divide", "arguments": {"x": 1, "y": 0}}', "raised", "raised ZeroDivisionError"),
             ('{"name": "nap", "arguments": {"seconds": 0.8}}', "timeout", "did not finish within 0.3 s"),
             ("not json", "malformed", "could not read this tool call")]
    text = "".join(f"<tool_call>{c}</tool_call>" for c, _, _ in calls)
    began = time.monotonic()
    future = box.run(text)
    assert time.monotonic() - began < 0.1  # run() hands back a future at once
    results = future.result(timeout=5)
    assert time.monotonic() - began < 0.8  # the calls run side by side: the timeout is waited once
    assert [r.error for r in results] == [kind for _, kind, _ in calls]
    for r, (_, _, text_part) in zip(results, calls):
        assert text_part in r.content
        assert r.message()["role"] == "tool" and r.message()["content"] == r.content
    assert results[0].message() == {"role": "tool", "name": "add", "content": "5"}
    metrics = tool_metrics(results)
    assert metrics["tools/calls"] == 9.0
    assert {k: metrics[f"tools/errors/{k}"] for k in TOOL_ERROR_KINDS} == {
        "malformed": 1.0, "unknown_tool": 1.0, "bad_arguments": 3.0, "raised": 1.0, "timeout": 1.0}
    assert box.run("plain text").result(timeout=1) == []


def test_long_results_are_cut_and_say_so_and_values_are_json():
    box = ToolBox([listing], max_result_chars=20)
    (r,) = box.run('<tool_call>{"name": "listing", "arguments": {"n": 100}}</tool_call>').result(timeout=5)
    assert r.error is None and r.content == "[0, 1, 2, 3, 4, 5, 6\n[... cut: 370 more characters]"
    (short,) = box.run('<tool_call>{"name": "listing", "arguments": {"n": 3}}</tool_call>').result(timeout=5)
    assert short.content == "[0, 1, 2]"


def test_parsers_are_pluggable_by_name_and_a_name_is_registered_once():
    name = "test-bracket"
    if name not in PARSERS:
        @register_parser(name)
        def bracket(text: str) -> ParsedTurn:  # "[[add 1 2]]"
            fn, *args = text.strip("[] ").split()
            return ParsedTurn((ToolCall(fn, {"a": int(args[0]), "b": int(args[1])}),), "")
    (r,) = ToolBox([add], parser=name).run("[[add 4 5]]").result(timeout=5)
    assert r.content == "9"
    with pytest.raises(ToolError, match="already registered"):
        register_parser("hermes")(parse_hermes)
    with pytest.raises(ToolError, match=r"unknown tool-call parser 'json5'; registered: \["):
        get_parser("json5")
    with pytest.raises(ToolError, match=r"tool names \['add'\] are given twice"):
        ToolBox([add, add])


def test_a_tool_loads_by_file_path(tmp_path):
    path = tmp_path / "mytools.py"
    path.write_text('def echo(text: str) -> str:\n    """Echoes.\n\n    Args:\n        text: what\n    """\n'
                    "    return text\n\nclass NotATool:\n    pass\n")
    tool = load_tool(f"{path}:echo")
    assert tool.name == "echo" and tool.schema["function"]["parameters"]["required"] == ["text"]
    with pytest.raises(ToolError, match="is a type, not a function"):
        load_tool(f"{path}:NotATool")
