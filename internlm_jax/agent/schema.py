"""JSON schemas from Python type hints and docstrings, and a small validator for the schemas we emit.

Supported annotations: str, int, float, bool, None, Any (or no annotation), list/list[T], tuple[T, ...],
set[T], dict/dict[str, T], Literal[...], Enum subclasses, Optional[T] / T | None, Union[A, B], and
Annotated[T, "description"]. Anything else is a TypeError naming the parameter, raised when the tool is made.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from typing import Any, Literal, Union

JSONSchema = dict[str, Any]

_PRIMITIVES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                                type(None): "null"}


def annotation_schema(tp: Any, where: str) -> JSONSchema:
    """The JSON schema of one type annotation; `where` names the parameter in error messages."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        schema = annotation_schema(base, where)
        desc = next((m for m in meta if isinstance(m, str)), None)
        return {**schema, "description": desc} if desc else schema
    if tp in _PRIMITIVES:
        return {"type": _PRIMITIVES[tp]}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        return {**_enum_type(values, where), "enum": values}
    if origin is Literal:
        values = list(typing.get_args(tp))
        return {**_enum_type(values, where), "enum": values}
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        non_null = [a for a in args if a is not type(None)]
        parts = [annotation_schema(a, where) for a in non_null]
        if len(non_null) < len(args):  # Optional: a bare primitive stays compact, `{"type": [t, "null"]}`
            if len(parts) == 1 and set(parts[0]) == {"type"} and isinstance(parts[0]["type"], str):
                return {"type": [parts[0]["type"], "null"]}
            parts.append({"type": "null"})
        return {"anyOf": parts}
    if tp in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset, typing.Sequence):
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"{where}: fixed-length tuple {tp!r} is not supported; use tuple[T, ...] or list[T]")
        schema: JSONSchema = {"type": "array"}
        if args:
            schema["items"] = annotation_schema(args[0], where)
        return schema
    if tp is dict or origin is dict:
        args = typing.get_args(tp)
        schema = {"type": "object"}
        if args:
            if args[0] is not str:
                raise TypeError(f"{where}: dict keys must be str for JSON, got {args[0]!r}")
            schema["additionalProperties"] = annotation_schema(args[1], where)
        return schema
    raise TypeError(f"{where}: unsupported type annotation {tp!r}; use str, int, float, bool, list[T], "
                    "dict[str, T], Literal[...], an Enum, Optional[T] or Annotated[T, 'description']")


def _enum_type(values: list[Any], where: str) -> JSONSchema:
    kinds = {_PRIMITIVES.get(type(v)) for v in values}
    if None in kinds:
        raise TypeError(f"{where}: enum values must be str, int, float, bool or None, got {values!r}")
    return {"type": kinds.pop()} if len(kinds) == 1 else {}


# ---- docstrings -------------------------------------------------------------------------------------------

_GOOGLE_SECTIONS = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?|"
                              r"Attributes|See Also|References)\s*:?\s*$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google- or numpy-style docstring into (summary, {param: description}).

    The summary is everything before the first section header, paragraphs joined by a blank line and lines
    within a paragraph joined by spaces.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    summary_lines: list[str] = []
    params: dict[str, str] = {}
    i = 0
    while i < len(lines) and not _is_section(lines, i):
        summary_lines.append(lines[i])
        i += 1
    while i < len(lines):
        header = lines[i].strip().rstrip(":")
        numpy_style = i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        i += 2 if numpy_style else 1
        body: list[str] = []
        while i < len(lines) and not _is_section(lines, i):
            body.append(lines[i])
            i += 1
        if header in ("Args", "Arguments", "Parameters", "Params"):
            params.update(_parse_params(body, numpy_style))
    paragraphs = [" ".join(p.split()) for p in "\n".join(summary_lines).split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p), params


def _is_section(lines: list[str], i: int) -> bool:
    line = lines[i]
    if line.startswith((" ", "\t")) or not _GOOGLE_SECTIONS.match(line):
        return False
    numpy_underline = i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
    return line.rstrip().endswith(":") or numpy_underline


_GOOGLE_PARAM = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_PARAM = re.compile(r"^(\*{0,2}\w+)\s*(:.*)?$")


def _parse_params(body: list[str], numpy_style: bool) -> dict[str, str]:
    """Entries start at the section's smallest indent; deeper-indented lines continue the entry above."""
    indents = [len(ln) - len(ln.lstrip()) for ln in body if ln.strip()]
    if not indents:
        return {}
    base = min(indents)
    out: dict[str, list[str]] = {}
    current: str | None = None
    for ln in body:
        if not ln.strip():
            continue
        indent = len(ln) - len(ln.lstrip())
        text = ln.strip()
        if indent == base:
            m = (_NUMPY_PARAM if numpy_style else _GOOGLE_PARAM).match(text)
            current = m.group(1).lstrip("*") if m else None
            if current is not None:
                out[current] = [] if numpy_style else [m.group(3)]
        elif current is not None:
            out[current].append(text)
    return {k: " ".join(" ".join(v).split()) for k, v in out.items()}


# ---- validation -------------------------------------------------------------------------------------------

def validate(value: Any, schema: JSONSchema, path: str = "arguments") -> list[str]:
    """Every way `value` breaks `schema` (the subset of JSON schema that `annotation_schema` emits)."""
    errors: list[str] = []
    if "anyOf" in schema:
        if not any(not validate(value, s, path) for s in schema["anyOf"]):
            errors.append(f"{path}: {_show(value)} matches none of {_describe(schema)}")
        return errors
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is_type(value, k) for k in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {_json_type(value)} {_show(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {_show(value)} is not one of {schema['enum']!r}")
    if isinstance(value, (list, tuple)) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict) and (kind == "object" or "properties" in schema):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required argument {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                errors += validate(item, props[name], f"{path}.{name}")
            elif extra is False:
                known = ", ".join(props) or "none"
                errors.append(f"{path}: unexpected argument {name!r} (accepted: {known})")
            elif isinstance(extra, dict):
                errors += validate(item, extra, f"{path}.{name}")
    return errors


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {"string": str, "boolean": bool, "null": type(None), "array": (list, tuple), "object": dict}
    if kind not in checks:
        raise ValueError(f"schema type {kind!r} is not supported by this validator")
    return isinstance(value, checks[kind])


def _json_type(value: Any) -> str:
    for kind in ("boolean", "integer", "number", "string", "null", "array", "object"):
        if _is_type(value, kind):
            return kind
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(schema: JSONSchema) -> str:
    return " | ".join(str(s.get("type", s.get("enum", "any"))) for s in schema["anyOf"])
