"""Built-in tools: a sandboxed Python interpreter, a calculator, and a workspace-bound file reader."""

from __future__ import annotations

import ast
import contextlib
import math
import operator
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Self

from internlm_jax.agent.sandbox import Sandbox, SandboxConfig
from internlm_jax.agent.tools import Tool, ToolError, ToolResult

# ---- python_interpreter -----------------------------------------------------------------------------------


class PythonInterpreter:
    """One stateful sandbox session behind the `python_interpreter` tool. The process starts on first use;
    if it dies (a timeout it ignored, a crash) the next call starts a fresh one and says so."""

    def __init__(self, config: SandboxConfig | None = None, **overrides: Any) -> None:
        self.sandbox = Sandbox(config, **overrides)
        self.tool = Tool.from_function(self.run, name="python_interpreter")

    def run(self, code: Annotated[str, "Python code to run; the value of the last expression is shown"]) -> Any:
        """Run Python code in a stateful interpreter session (variables persist between calls). Prints and
        the value of the last expression are returned; numpy and the standard library are available; there
        is no network and only the working directory is readable and writable."""
        restarted = False
        if self.sandbox.pid is not None and not self.sandbox.alive:
            self.sandbox.restart()
            restarted = True
        result = self.sandbox.run(code)
        parts = ["[the interpreter was restarted; earlier variables are gone]"] if restarted else []
        parts += [p for p in (result.stdout.rstrip("\n"), result.result or "") if p]
        output = "\n".join(parts)
        if result.ok:
            return output
        error = (result.error or "") + ("" if result.alive else "\n[the next call starts a fresh interpreter]")
        return ToolResult.failure(error, "timeout" if result.timed_out else "tool_error", content=output or None)

    def close(self) -> None:
        self.sandbox.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- calculator -------------------------------------------------------------------------------------------

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.BitXor: operator.pow}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "ln": math.log, "log10": math.log10,
    "log2": math.log2, "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin,
    "acos": math.acos, "atan": math.atan, "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh,
    "tanh": math.tanh, "degrees": math.degrees, "radians": math.radians, "hypot": math.hypot,
    "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "min": min, "max": max,
    "gcd": math.gcd, "lcm": math.lcm, "factorial": math.factorial, "comb": math.comb, "perm": math.perm}
_MAX_INT_BITS = 4096
_MAX_LENGTH = 1000


def calculator(expression: Annotated[str, "An arithmetic expression, e.g. '(2 + 3) * sqrt(16) / 7'"]) -> Any:
    """Evaluate an arithmetic expression exactly as a calculator would. Supports + - * / // % ** (and ^ as
    power), parentheses, pi, e, and the functions sqrt, exp, log, ln, log10, log2, sin, cos, tan, asin,
    acos, atan, atan2, sinh, cosh, tanh, degrees, radians, hypot, abs, round, floor, ceil, min, max, gcd,
    lcm, factorial, comb, perm."""
    if len(expression) > _MAX_LENGTH:
        raise ToolError(f"expression is {len(expression)} characters long; the limit is {_MAX_LENGTH}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an arithmetic expression: {e.msg} at column {e.offset}") from None
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except (ValueError, TypeError) as e:
        raise ToolError(f"math error: {e}") from None
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan: say it in words
    return value


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ToolError(f"unknown name {node.id!r}; known constants: {', '.join(_CONSTANTS)}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, (ast.Pow, ast.BitXor)):
            _check_power(left, right)
        result = _BINARY[type(node.op)](left, right)
        return _check_size(result)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        if node.func.id not in _FUNCTIONS:
            raise ToolError(f"unknown function {node.func.id!r}; known: {', '.join(_FUNCTIONS)}")
        args = [_evaluate(a) for a in node.args]
        if node.func.id in ("factorial", "comb", "perm") and any(isinstance(a, int) and a > 1000 for a in args):
            raise ToolError(f"{node.func.id} arguments above 1000 are not supported")
        return _check_size(_FUNCTIONS[node.func.id](*args))
    raise ToolError(f"unsupported syntax {ast.unparse(node)!r}: only numbers, + - * / // % ** ^, parentheses, "
                    "constants and math functions are allowed")


def _check_power(base: Any, exponent: Any) -> None:
    """Refuse integer powers whose result would have more than _MAX_INT_BITS bits before computing them."""
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
            and (abs(base).bit_length() - 1) * exponent > _MAX_INT_BITS):
        raise ToolError(f"{base} ** {exponent} is too large to compute")
    if isinstance(base, complex) or isinstance(exponent, complex):
        raise ToolError("complex numbers are not supported")


def _check_size(value: Any) -> Any:
    if isinstance(value, complex):
        raise ToolError("the result is a complex number, which is not supported")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise ToolError("the result is too large")
    return value


calculator_tool = Tool.from_function(calculator)


# ---- read_file --------------------------------------------------------------------------------------------

def file_reader(workspace: str | os.PathLike[str], max_chars: int = 100_000) -> Tool:
    """A `read_file` tool that reads text files inside `workspace` only (no `..`, absolute paths or symlinks
    leading out of it)."""
    root = Path(workspace).resolve(strict=True)
    if not root.is_dir():
        raise NotADirectoryError(f"workspace {root} is not a folder")

    def read_file(path: Annotated[str, "File path relative to the workspace folder"]) -> str:
        """Read a text file from the workspace folder."""
        outside = ToolError(f"{path!r} is outside the workspace; give a path relative to the workspace folder")
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise outside
        try:  # no symlink at the end, no blocking on a fifo; then check what was really opened
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise ToolError(f"{path!r} is not a readable file in the workspace") from None
        with os.fdopen(fd, "rb", closefd=True) if stat.S_ISREG(os.fstat(fd).st_mode) else _closing(fd) as f:
            if f is None:
                raise ToolError(f"{path!r} is not a regular file")
            opened = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists("/proc/self/fd") else target
            if not opened.is_relative_to(root):  # a folder on the way was swapped for a symlink
                raise outside
            data = f.read(4 * max_chars + 4)
        if b"\x00" in data[:8192]:
            raise ToolError(f"{path!r} is a binary file; only text files can be read")
        text = data.decode("utf-8", errors="replace")
        if len(text) > max_chars or len(data) > 4 * max_chars:
            text = text[:max_chars] + f"\n[... truncated: the file is longer than {max_chars} characters]"
        return text

    return Tool.from_function(read_file)


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[None]:
    """Stands in for a file object when the fd is not a regular file: closes it and yields None."""
    try:
        yield None
    finally:
        os.close(fd)
