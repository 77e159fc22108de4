"""Tools from typed Python functions, toolkits of several tools, and structured results.

    @tool
    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> dict:
        '''Current weather of a city.

        Args:
            city: City name, e.g. "Shanghai".
            unit: Temperature unit.
        '''

    get_weather.to_openai()                 # {"type": "function", "function": {name, description, parameters}}
    get_weather({"city": "Shanghai"})       # ToolResult(ok=True, content={...}, error=None)
    get_weather({"town": "Shanghai"})       # ToolResult(ok=False, error="arguments: missing required ...")

A tool never raises for bad arguments or a failing function: the result says what went wrong, so an agent
can show it to the model. Raise `ToolError("message")` inside a tool for a clean, traceback-free message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal

from internlm_jax.agent.schema import JSONSchema, annotation_schema, parse_docstring, validate

ErrorType = Literal["invalid_arguments", "tool_error", "unknown_tool", "timeout", "remote_error"]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(Exception):
    """Raise inside a tool to report a failure to the model with exactly this message."""


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a tool call produced: `content` (a string or JSON value) when ok, else an `error` message."""

    ok: bool
    content: Any = None
    error: str | None = None
    error_type: ErrorType | None = None

    @classmethod
    def success(cls, content: Any) -> ToolResult:
        return cls(ok=True, content=content)

    @classmethod
    def failure(cls, error: str, error_type: ErrorType = "tool_error", content: Any = None) -> ToolResult:
        return cls(ok=False, content=content, error=error, error_type=error_type)

    def to_text(self) -> str:
        """The text an agent feeds back to the model (the environment turn)."""
        body = self.content if isinstance(self.content, str) or self.content is None else \
            json.dumps(self.content, ensure_ascii=False)
        if self.ok:
            return body or ""
        return (body + "\n" if body else "") + f"Error: {self.error}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolResult:
        unknown = set(data) - {"ok", "content", "error", "error_type"}
        if "ok" not in data or unknown:
            raise ValueError(f"not a ToolResult object (keys {sorted(data)}); expected ok, content, error, error_type")
        return cls(ok=bool(data["ok"]), content=data.get("content"), error=data.get("error"),
                   error_type=data.get("error_type"))


class Tool:
    """A named callable with a JSON-schema for its arguments. Make one with `Tool.from_function` or `@tool`."""

    def __init__(self, name: str, description: str, parameters: JSONSchema,
                 func: Callable[..., Any] | None = None) -> None:
        if not _NAME.match(name):
            raise ValueError(f"tool name {name!r} must be 1-64 characters of letters, digits, '_' or '-'")
        if parameters.get("type") != "object":
            raise ValueError(f"tool {name!r}: parameters must be a JSON schema with \"type\": \"object\", "
                             f"got {parameters!r}")
        self.name = name
        self.description = description
        self.parameters = parameters
        self.func = func
        self._converters: dict[str, Callable[[Any], Any]] = {}

    @classmethod
    def from_function(cls, func: Callable[..., Any], name: str | None = None,
                      description: str | None = None) -> Tool:
        """Derive name, description and parameter schema from `func`'s signature, hints and docstring."""
        name = name or func.__name__
        summary, doc_params = parse_docstring(func.__doc__)
        hints = typing.get_type_hints(func, include_extras=True)
        properties: dict[str, JSONSchema] = {}
        required: list[str] = []
        converters: dict[str, Callable[[Any], Any]] = {}
        for pname, param in inspect.signature(func).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
                raise TypeError(f"tool {name!r}: parameter {pname!r} is {param.kind.description}; tools take "
                                "named arguments only")
            annotation = hints.get(pname, inspect.Parameter.empty)
            schema = annotation_schema(annotation, f"tool {name!r}, parameter {pname!r}")
            if "description" not in schema and pname in doc_params:
                schema["description"] = doc_params[pname]
            if param.default is param.empty:
                required.append(pname)
            else:
                default = param.default.value if isinstance(param.default, enum.Enum) else param.default
                if _is_json(default):
                    schema["default"] = json.loads(json.dumps(default))  # tuples become lists, as in JSON
            properties[pname] = schema
            if (convert := _converter(annotation)) is not None:
                converters[pname] = convert
        parameters = {"type": "object", "properties": properties, "required": required,
                      "additionalProperties": False}
        made = cls(name, description if description is not None else summary, parameters, func)
        made._converters = converters
        return made

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tools[i]` object."""
        return {"type": "function", "function": self.to_function()}

    def to_function(self) -> dict[str, Any]:
        """The function object that InternLM2's plugin system turn lists: name, description, parameters."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    # ---- calling ----

    def check(self, arguments: dict[str, Any] | str | None) -> tuple[dict[str, Any] | None, ToolResult | None]:
        """Parse and validate arguments: (arguments, None) when usable, else (None, an error result)."""
        if arguments is None:
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return None, ToolResult.failure(f"arguments for {self.name!r} are not valid JSON: {e}",
                                                "invalid_arguments")
        if not isinstance(arguments, dict):
            return None, ToolResult.failure(f"arguments for {self.name!r} must be a JSON object, got "
                                            f"{type(arguments).__name__}", "invalid_arguments")
        errors = validate(arguments, self.parameters)
        if errors:
            return None, ToolResult.failure(f"invalid arguments for {self.name!r}: " + "; ".join(errors),
                                            "invalid_arguments")
        return arguments, None

    def __call__(self, arguments: dict[str, Any] | str | None = None, /, **kwargs: Any) -> ToolResult:
        """Run the tool synchronously (an async tool runs on its own event loop)."""
        args, bad = self.check(_merge(arguments, kwargs))
        if bad is not None:
            return bad
        try:
            if self.is_async:
                return self._wrap(_run_coroutine(self._ainvoke(args)))
            return self._wrap(self._invoke(args))
        except Exception as e:  # noqa: BLE001 - every failure becomes a structured result
            return _failure_from(e)

    async def acall(self, arguments: dict[str, Any] | str | None = None, /, **kwargs: Any) -> ToolResult:
        """Run the tool from async code; a sync tool runs in a worker thread so the event loop stays free."""
        args, bad = self.check(_merge(arguments, kwargs))
        if bad is not None:
            return bad
        try:
            if self.is_async:
                return self._wrap(await self._ainvoke(args))
            return self._wrap(await asyncio.to_thread(self._invoke, args))
        except Exception as e:  # noqa: BLE001
            return _failure_from(e)

    def _invoke(self, args: dict[str, Any]) -> Any:
        if self.func is None:
            raise ToolError(f"tool {self.name!r} has no function to run")
        return self.func(**self._convert(args))

    async def _ainvoke(self, args: dict[str, Any]) -> Any:
        if self.func is None:
            raise ToolError(f"tool {self.name!r} has no function to run")
        return await typing.cast(Callable[..., Awaitable[Any]], self.func)(**self._convert(args))

    def _convert(self, args: dict[str, Any]) -> dict[str, Any]:
        return {k: self._converters[k](v) if k in self._converters and v is not None else v
                for k, v in args.items()}

    @staticmethod
    def _wrap(value: Any) -> ToolResult:
        if isinstance(value, ToolResult):
            return value
        return ToolResult.success(value if isinstance(value, str) or _is_json(value) else str(value))

    def __repr__(self) -> str:
        return f"Tool(name={self.name!r}, parameters={list(self.parameters.get('properties', {}))})"


def tool(func: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Decorator: `@tool` or `@tool(name=..., description=...)` turns a typed function into a `Tool`."""
    if func is None:
        return lambda f: Tool.from_function(f, name=name, description=description)
    return Tool.from_function(func, name=name, description=description)


class Toolkit:
    """Several tools by name. Accepts `Tool` objects and plain typed functions."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, item: Tool | Callable[..., Any]) -> Tool:
        made = item if isinstance(item, Tool) else Tool.from_function(item)
        if made.name in self._tools:
            raise ValueError(f"toolkit already has a tool named {made.name!r}; pass name= to rename one")
        self._tools[made.name] = made
        return made

    def __getitem__(self, name: str) -> Tool:
        if name not in self._tools:
            raise KeyError(f"no tool named {name!r}; available: {', '.join(self._tools) or 'none'}")
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def to_openai(self) -> list[dict[str, Any]]:
        return [t.to_openai() for t in self]

    def to_functions(self) -> list[dict[str, Any]]:
        return [t.to_function() for t in self]

    def _missing(self, name: str) -> ToolResult:
        return ToolResult.failure(f"unknown tool {name!r}; available: {', '.join(self._tools) or 'none'}",
                                  "unknown_tool")

    def call(self, name: str, arguments: dict[str, Any] | str | None = None) -> ToolResult:
        return self._tools[name](arguments) if name in self._tools else self._missing(name)

    async def acall(self, name: str, arguments: dict[str, Any] | str | None = None) -> ToolResult:
        return await self._tools[name].acall(arguments) if name in self._tools else self._missing(name)


# ---- helpers ----------------------------------------------------------------------------------------------

def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _merge(arguments: dict[str, Any] | str | None, kwargs: dict[str, Any]) -> dict[str, Any] | str | None:
    """Keyword arguments given directly to a call join the argument dict (a JSON string stays as it is)."""
    if not kwargs:
        return arguments
    if isinstance(arguments, str):
        raise TypeError("pass arguments either as one JSON string or as keywords, not both")
    return {**(arguments or {}), **kwargs}


def _failure_from(e: Exception) -> ToolResult:
    if isinstance(e, ToolError):
        return ToolResult.failure(str(e))
    if isinstance(e, TimeoutError):
        return ToolResult.failure(f"timed out: {e}", "timeout")
    return ToolResult.failure(f"{type(e).__name__}: {e}")


def _run_coroutine(coro: Awaitable[Any]) -> Any:
    """Run a coroutine to completion from sync code, also when the calling thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(typing.cast(typing.Coroutine[Any, Any, Any], coro))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _converter(annotation: Any) -> Callable[[Any], Any] | None:
    """JSON values -> the Python types the function asked for (Enum members, tuples, sets)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _converter(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _converter(inner[0]) if len(inner) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    container = origin or annotation
    if container in (tuple, set, frozenset, list):
        args = typing.get_args(annotation)
        item = _converter(args[0]) if args else None
        return (lambda v: container(item(x) for x in v)) if item else \
            (None if container is list else container)
    return None
