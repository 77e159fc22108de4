"""Tools from typed functions: schemas equal hand-written JSON schemas; calls give structured results."""

from __future__ import annotations

import asyncio
import enum
import os
from typing import Annotated, Any, Literal, Optional

import pytest

from internlm_jax.agent import Tool, ToolError, Toolkit, ToolResult, calculator_tool, file_reader, tool
from internlm_jax.agent.schema import parse_docstring, validate


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(city: Annotated[str, "City name, e.g. Shanghai"], unit: Unit = Unit.CELSIUS,
                days: Optional[int] = None) -> dict:  # noqa: UP045 - typing.Optional is under test
    """Get the current weather of a city.

    Args:
        city: overridden by the Annotated description.
        unit: Temperature unit
            for the answer.
        days (int, optional): Forecast days.

    Returns:
        dict: the weather.
    """
    return {"city": city, "unit": unit.value, "days": days}


def search(query: str, tags: list[str], limit: int = 10, exact: bool = False,
           mode: Literal["fast", "deep"] = "fast", weights: dict[str, float] | None = None,
           scores: list[list[float]] = ()) -> list[str]:  # type: ignore[assignment]
    """Search documents.

    A longer explanation that
    spans lines.

    Parameters
    ----------
    query : str
        What to look for.
    tags : list of str
        Tags that must all match.
    limit : int
        At most this many results.
    """
    return [query] * min(limit, 2)


async def add(a: int, b: float = 0.5) -> float:
    """Add two numbers."""
    await asyncio.sleep(0)
    return a + b


def untyped(x, y: Any = None):
    return x


EXPECTED = {
    "get_weather": {
        "name": "get_weather",
        "description": "Get the current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Shanghai"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                         "description": "Temperature unit for the answer.", "default": "celsius"},
                "days": {"type": ["integer", "null"], "description": "Forecast days.", "default": None},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "search": {
        "name": "search",
        "description": "Search documents.\n\nA longer explanation that spans lines.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "tags": {"type": "array", "items": {"type": "string"},
                         "description": "Tags that must all match."},
                "limit": {"type": "integer", "description": "At most this many results.", "default": 10},
                "exact": {"type": "boolean", "default": False},
                "mode": {"type": "string", "enum": ["fast", "deep"], "default": "fast"},
                "weights": {"anyOf": [{"type": "object", "additionalProperties": {"type": "number"}},
                                      {"type": "null"}], "default": None},
                "scores": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                           "default": []},
            },
            "required": ["query", "tags"],
            "additionalProperties": False,
        },
    },
    "add": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "number", "default": 0.5}},
            "required": ["a"],
            "additionalProperties": False,
        },
    },
    "untyped": {
        "name": "untyped",
        "description": "",
        "parameters": {"type": "object", "properties": {"x": {}, "y": {"default": None}}, "required": ["x"],
                       "additionalProperties": False},
    },
}


@pytest.mark.parametrize("func", [get_weather, search, add, untyped], ids=lambda f: f.__name__)
def test_schema_equals_hand_written(func):
    t = Tool.from_function(func)
    assert t.to_function() == EXPECTED[func.__name__]
    assert t.to_openai() == {"type": "function", "function": EXPECTED[func.__name__]}


def test_decorator_and_overrides():
    @tool(name="weather", description="Custom.")
    def f(city: str) -> str:
        """Ignored."""
        return city

    assert isinstance(f, Tool) and f.name == "weather" and f.description == "Custom."
    assert f({"city": "x"}) == ToolResult(ok=True, content="x")


def test_docstring_parser_google_and_numpy():
    summary, params = parse_docstring("""Do it.

        Args:
            a (int): first
                continued.
            *rest: ignored kind but parsed.

        Raises:
            ValueError: never.
        """)
    assert summary == "Do it."
    assert params == {"a": "first continued.", "rest": "ignored kind but parsed."}
    summary, params = parse_docstring("Sum.\n\nParameters\n----------\nx : int\n    The x.\ny\n    The y.\n")
    assert (summary, params) == ("Sum.", {"x": "The x.", "y": "The y."})


def test_unsupported_annotations_fail_at_creation():
    def f(x: set[bytes]) -> None: ...  # bytes is not JSON

    def g(*args: int) -> None: ...

    def h(x: dict[int, str]) -> None: ...

    def k(x: tuple[int, str]) -> None: ...

    with pytest.raises(TypeError, match="parameter 'x': unsupported type annotation"):
        Tool.from_function(f)
    with pytest.raises(TypeError, match="named arguments only"):
        Tool.from_function(g)
    with pytest.raises(TypeError, match="dict keys must be str"):
        Tool.from_function(h)
    with pytest.raises(TypeError, match="fixed-length tuple"):
        Tool.from_function(k)
    with pytest.raises(ValueError, match="tool name"):
        Tool("bad name!", "", {"type": "object"})


def test_call_converts_and_validates():
    t = Tool.from_function(get_weather)
    assert t({"city": "Shanghai", "unit": "fahrenheit"}) == ToolResult(
        ok=True, content={"city": "Shanghai", "unit": "fahrenheit", "days": None})
    assert t('{"city": "Paris", "days": 3}').content == {"city": "Paris", "unit": "celsius", "days": 3}
    assert t(city="Rome").ok

    cases = {
        '{"city": 3}': "arguments.city: expected string, got integer 3",
        '{"city": "x", "unit": "kelvin"}': "arguments.unit: 'kelvin' is not one of ['celsius', 'fahrenheit']",
        '{"town": "x"}': "arguments: missing required argument 'city'; arguments: unexpected argument 'town' "
                         "(accepted: city, unit, days)",
        '{"city": "x", "days": true}': "arguments.days: expected integer or null, got boolean True",
    }
    for args, message in cases.items():
        result = t(args)
        assert result == ToolResult(ok=False, error=f"invalid arguments for 'get_weather': {message}",
                                    error_type="invalid_arguments"), args
    bad_json = t('{"city": ')
    assert bad_json.error_type == "invalid_arguments" and "not valid JSON" in bad_json.error
    assert t("[1]").error == "arguments for 'get_weather' must be a JSON object, got list"

    s = Tool.from_function(search)
    assert s({"query": "q", "tags": ["a", 1]}).error.endswith("arguments.tags[1]: expected string, got integer 1")
    assert s({"query": "q", "tags": [], "weights": {"a": "x"}}).error.endswith(
        "arguments.weights: {'a': 'x'} matches none of object | null")
    assert s({"query": "q", "tags": [], "scores": [[1, 2.5]]}).content == ["q", "q"]


def test_errors_inside_tools_are_structured():
    @tool
    def boom(x: int) -> int:
        """Fails."""
        if x == 0:
            raise ToolError("x must not be zero")
        return 1 // (x - 1)

    assert boom({"x": 0}) == ToolResult(ok=False, error="x must not be zero", error_type="tool_error")
    assert boom({"x": 1}) == ToolResult(ok=False, error="ZeroDivisionError: integer division or modulo by zero",
                                        error_type="tool_error")
    assert boom({"x": 2}).to_text() == "1"
    assert boom({"x": 0}).to_text() == "Error: x must not be zero"


def test_async_tools_sync_and_async_calls():
    t = Tool.from_function(add)
    assert t.is_async
    assert t({"a": 1}) == ToolResult(ok=True, content=1.5)

    async def inside_loop():
        # sync call of an async tool from a running loop, and acall of sync + async tools
        return t({"a": 2, "b": 1}), await t.acall({"a": 3}), await Tool.from_function(get_weather).acall(city="x")

    sync_in_loop, async_result, sync_tool = asyncio.run(inside_loop())
    assert sync_in_loop.content == 3 and async_result.content == 3.5 and sync_tool.content["city"] == "x"


def test_toolkit():
    kit = Toolkit([get_weather, add, calculator_tool])
    assert kit.names == ["get_weather", "add", "calculator"]
    assert kit.to_openai()[1] == {"type": "function", "function": EXPECTED["add"]}
    assert kit.call("add", {"a": 1, "b": 2}).content == 3
    assert asyncio.run(kit.acall("calculator", {"expression": "2 ^ 8"})).content == 256
    assert kit.call("nope", {}) == ToolResult(ok=False, error="unknown tool 'nope'; available: get_weather, add, "
                                              "calculator", error_type="unknown_tool")
    with pytest.raises(ValueError, match="already has a tool named 'add'"):
        kit.add(add)
    with pytest.raises(KeyError, match="no tool named 'x'"):
        kit["x"]


def test_validator_reports_every_error():
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
              "required": ["a", "b"], "additionalProperties": False}
    assert validate({"a": [1, "2", 3.5]}, schema) == [
        "arguments: missing required argument 'b'", "arguments.a[1]: expected integer, got string '2'",
        "arguments.a[2]: expected integer, got number 3.5"]


@pytest.mark.parametrize("expression,expected", [
    ("(2 + 3) * sqrt(16) / 8", 2.5), ("2 ^ 10", 1024), ("2 ** -1", 0.5), ("7 // 2 + 7 % 2", 4),
    ("-factorial(5)", -120), ("round(pi, 3)", 3.142), ("max(1, 2, 3) + abs(-4)", 7), ("log(e ** 2)", 2.0),
])
def test_calculator_values(expression, expected):
    assert calculator_tool({"expression": expression}) == ToolResult(ok=True, content=expected)


@pytest.mark.parametrize("expression,error", [
    ("1 / 0", "division by zero"),
    ("10 ** 10 ** 10", "10 ** 10000000000 is too large to compute"),
    ("__import__('os')", "unknown function '__import__'"),
    ("__import__('os').system('true')", 'unsupported syntax "__import__(\'os\').system(\'true\')"'),
    ("().__class__", "unsupported syntax '().__class__'"),
    ("x + 1", "unknown name 'x'"),
    ("sqrt(-1)", "math error: math domain error"),
    ("(-8) ** (1/3)", "the result is a complex number"),
    ("2 +", "not an arithmetic expression"),
    ("factorial(100000)", "factorial arguments above 1000 are not supported"),
])
def test_calculator_refusals(expression, error):
    result = calculator_tool({"expression": expression})
    assert not result.ok and result.error.startswith(error), result


def test_read_file_stays_in_workspace(tmp_path):
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "a.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", ws / "link.txt")
    os.symlink(tmp_path, ws / "dirlink")
    (ws / "bin").write_bytes(b"\x00\x01")
    read = file_reader(ws, max_chars=3)
    assert read({"path": "sub/a.txt"}).content == "hel\n[... truncated: the file is longer than 3 characters]"
    assert file_reader(ws)({"path": "sub/../sub/a.txt"}).content == "hello"
    for path in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt", "dirlink/secret.txt",
                 "sub/../../secret.txt", "/etc/passwd"):
        result = read({"path": path})
        assert result.error == f"{path!r} is outside the workspace; give a path relative to the workspace folder"
    assert read({"path": "sub"}).error == "'sub' is not a regular file"
    assert read({"path": "bin"}).error == "'bin' is a binary file; only text files can be read"
    assert read({"path": "missing"}).error == "'missing' is not a readable file in the workspace"
