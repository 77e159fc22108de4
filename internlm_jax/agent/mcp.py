"""Tools over the Model Context Protocol (MCP), with the official `mcp` SDK: a server for our toolkits and a
client toolkit that brings any MCP server's tools into the agent loop.

    # serve (the same JSON schemas our tools derive from their type hints; `internlm-jax tools serve --mcp`)
    server = create_mcp_server(Toolkit([calculator_tool, get_weather]))
    with MCPServerThread(server) as url:                      # streamable HTTP on 127.0.0.1, path /mcp
        ...
    serve_mcp_stdio(server)                                   # or over this process's stdin/stdout

    # use (any MCP server: ours, one written with the SDK or fastmcp, a third-party one)
    with MCPToolkit("http://127.0.0.1:8000/mcp", timeout=30) as toolkit:           # streamable HTTP
        agent = Agent(backend, toolkit)
    with MCPToolkit(["npx", "-y", "@modelcontextprotocol/server-everything"]) as toolkit:   # stdio subprocess
        ...

Tool results: an MCP `tools/call` result carries text (what the model reads), optional structured content and
`isError`. Our server writes `ToolResult.to_text()` as the text, the content itself as structured content when
it is a JSON object, and our error type (`invalid_arguments`, `timeout`, ...) under `_meta`. The client turns
every answer into a `ToolResult` and never raises from a call: a timeout, bad arguments, an MCP protocol error
or a server that went away all come back as failed results that the agent shows to the model.

The client keeps one MCP session open (one subprocess for stdio) on a private event-loop thread until
`close()`; its tools are plain `Tool` objects, so the sync agent loop and async code can both call them.
Needs the `mcp` package (`pip install 'internlm-jax[agents]'`); it is imported when one of these is used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shlex
import threading
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from typing import Any, Self

from internlm_jax.agent.tools import Tool, Toolkit, ToolResult, _is_json, _merge

ERROR_TYPE_META = "internlm-jax/error_type"
DEFAULT_PATH = "/mcp"
_NO_MCP = ("MCP support needs the official `mcp` SDK (2.x), which is not installed: "
           "pip install 'internlm-jax[agents]' (or pip install 'mcp>=2.3,<3')")


def _import_mcp() -> Any:
    try:
        import mcp
        import mcp_types  # noqa: F401 - the SDK's types package, installed with it
    except ImportError as e:
        raise ImportError(_NO_MCP) from e
    if not hasattr(mcp, "Client"):
        raise ImportError(f"{_NO_MCP}; the installed mcp {getattr(mcp, '__version__', '?')} is too old")
    return mcp


# ---- server -----------------------------------------------------------------------------------------------

def create_mcp_server(tools: Toolkit | Iterable[Tool | Any], *, name: str = "internlm-jax",
                      instructions: str | None = None, call_timeout: float | None = None) -> Any:
    """An `mcp.server.Server` (the SDK's low-level server) for a toolkit.

    `tools/list` gives each tool's name, description and JSON schema exactly as `Tool.to_function()` does;
    `tools/call` runs the tool (sync tools in a worker thread) and answers with its result; failures are
    results with `isError: true` (arguments that do not fit the schema included, so the model can correct
    them); an unknown tool name is a JSON-RPC "invalid params" error, as the MCP specification asks.
    `call_timeout` (seconds) cuts a call that runs longer with a `timeout` error result; a sync tool's thread
    cannot be killed and finishes in the background (the sandboxed interpreter has its own wall limit).
    """
    _import_mcp()
    import mcp_types as types
    from mcp.server import Server
    from mcp.shared.exceptions import MCPError

    toolkit = tools if isinstance(tools, Toolkit) else Toolkit(tools)
    if call_timeout is not None and call_timeout <= 0:
        raise ValueError(f"call_timeout must be positive seconds or None, got {call_timeout}")
    listed = [types.Tool(name=t.name, description=t.description, input_schema=t.parameters) for t in toolkit]

    async def on_list_tools(ctx: Any, params: Any) -> Any:
        return types.ListToolsResult(tools=listed)

    async def on_call_tool(ctx: Any, params: Any) -> Any:
        if params.name not in toolkit:
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {params.name!r}; available: "
                           f"{', '.join(toolkit.names) or 'none'}")
        call = toolkit.acall(params.name, params.arguments or {})
        try:
            result = await (asyncio.wait_for(call, call_timeout) if call_timeout else call)
        except TimeoutError:
            result = ToolResult.failure(f"the tool {params.name!r} did not finish within {call_timeout:g}s",
                                        "timeout")
        return to_call_result(result)

    from internlm_jax import __version__

    return Server(name, version=__version__, instructions=instructions, on_list_tools=on_list_tools,
                  on_call_tool=on_call_tool,
                  get_tool_input_schema=lambda n: toolkit[n].parameters if n in toolkit else None)


def to_call_result(result: ToolResult) -> Any:
    """A ToolResult as an MCP CallToolResult (text for the model, structured content for a JSON object)."""
    import mcp_types as types

    structured = result.content if result.ok and isinstance(result.content, dict) and _is_json(result.content) \
        else None
    meta = {ERROR_TYPE_META: result.error_type} if not result.ok and result.error_type else None
    return types.CallToolResult(content=[types.TextContent(type="text", text=result.to_text())],
                                structured_content=structured, is_error=not result.ok, _meta=meta)


def mcp_http_app(server: Any, *, host: str = "127.0.0.1", path: str = DEFAULT_PATH,
                 stateless: bool = False, json_response: bool = False) -> Any:
    """The streamable-HTTP ASGI app (Starlette) of an MCP server, endpoint `path`. Its lifespan runs the
    SDK's session manager: serve it with lifespan on. On loopback hosts the SDK's DNS-rebinding protection is
    on (Host and Origin must be loopback)."""
    return server.streamable_http_app(streamable_http_path=path, host=host, stateless_http=stateless,
                                      json_response=json_response)


class MCPServerThread:
    """An MCP server over streamable HTTP in a background thread: `with MCPServerThread(server) as url:`
    (url ends in /mcp). Binds 127.0.0.1 and a free port unless told otherwise."""

    def __init__(self, server: Any, host: str = "127.0.0.1", port: int = 0, path: str = DEFAULT_PATH) -> None:
        from internlm_jax.agent.tool_server import ToolServer

        self._http = ToolServer(mcp_http_app(server, host=host, path=path), host=host, port=port, lifespan="on")
        self.path = path

    @property
    def url(self) -> str:
        return self._http.url + self.path

    def start(self, timeout: float = 30.0) -> str:
        self._http.start(timeout)
        return self.url

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_mcp_http(server: Any, host: str = "127.0.0.1", port: int = 8000, path: str = DEFAULT_PATH,
                   log_level: str = "info") -> None:
    """Serve over streamable HTTP in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(mcp_http_app(server, host=host, path=path), host=host, port=port, log_level=log_level,
                lifespan="on")


def serve_mcp_stdio(server: Any) -> None:
    """Serve one client over this process's stdin/stdout until it closes stdin. While serving, the SDK points
    fd 1 at stderr, so stray prints cannot corrupt the protocol stream."""
    _import_mcp()
    import anyio
    from mcp.server.stdio import stdio_server

    async def run() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())

    anyio.run(run)


# ---- client -----------------------------------------------------------------------------------------------

class MCPTool(Tool):
    """One tool of an MCP server. Arguments are checked against the server's schema here first when it is a
    schema our validator understands (else the server checks them); calls never raise."""

    def __init__(self, toolkit: MCPToolkit, spec: Any) -> None:
        schema = dict(spec.input_schema or {})
        schema.setdefault("type", "object")
        super().__init__(_local_name(spec.name, toolkit.names), spec.description or "", schema)
        self.remote_name = spec.name  # MCP allows names (dots, 128 characters) that our Tool names do not
        self._toolkit = toolkit
        self._checkable = _validator_understands(schema)

    @property
    def is_async(self) -> bool:
        return False

    def check(self, arguments: dict[str, Any] | str | None) -> tuple[dict[str, Any] | None, ToolResult | None]:
        args, bad = super().check(arguments)
        if bad is not None and bad.error_type == "invalid_arguments" and not self._checkable and \
                isinstance(arguments, dict):
            return arguments, None  # a schema feature we do not validate: let the server judge
        return args, bad

    def _invoke(self, args: dict[str, Any]) -> Any:
        return self._toolkit._call_sync(self.remote_name, args)

    async def acall(self, arguments: dict[str, Any] | str | None = None, /, **kwargs: Any) -> ToolResult:
        args, bad = self.check(_merge(arguments, kwargs))
        if bad is not None:
            return bad
        return await self._toolkit._call_async(self.remote_name, args)


class MCPToolkit(Toolkit):
    """The tools of any MCP server as a Toolkit: `Agent(backend, MCPToolkit(url_or_command))`.

    `server`: an `http(s)://` URL (streamable HTTP, e.g. `http://127.0.0.1:8000/mcp`), a command line (a list,
    or a string split like a shell would) that starts a server speaking MCP over stdio, or an
    `mcp.StdioServerParameters`. `env` adds environment variables for a stdio server (the SDK passes only a
    minimal environment: HOME, PATH, ...), `cwd` sets its folder. `timeout` bounds each tool call (seconds;
    the call comes back as a `timeout` error result), `connect_timeout` the connection and tool listing.
    Use it as a context manager, or call `close()`: that ends the session and a stdio server's process.
    """

    def __init__(self, server: str | Sequence[str] | Any, *, timeout: float = 60.0, connect_timeout: float = 60.0,
                 env: dict[str, str] | None = None, cwd: str | None = None, name: str | None = None) -> None:
        super().__init__()
        mcp = _import_mcp()
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError(f"timeout and connect_timeout must be positive seconds, got {timeout}, "
                             f"{connect_timeout}")
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.target = self._target(mcp, server, env, cwd)
        self.name = name or self._describe(server)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"mcp-client {self.name}", daemon=True)
        self._thread.start()
        self._client: Any = None
        self._closing: asyncio.Event | None = None
        self._session_task: concurrent.futures.Future[None] | None = None
        self._lost: str | None = None
        try:
            specs = self._connect()
        except BaseException:
            self.close()
            raise
        for spec in specs:
            self.add(MCPTool(self, spec))

    @staticmethod
    def _target(mcp: Any, server: Any, env: dict[str, str] | None, cwd: str | None) -> Any:
        if isinstance(server, mcp.StdioServerParameters):
            return server
        if isinstance(server, str) and server.startswith(("http://", "https://")):
            if env or cwd:
                raise ValueError("env= and cwd= apply to a stdio server command, not to a URL")
            return server
        argv = shlex.split(server) if isinstance(server, str) else [str(a) for a in server]
        if not argv:
            raise ValueError("MCPToolkit needs a URL (http://.../mcp) or a command that starts an MCP stdio server")
        return mcp.StdioServerParameters(command=argv[0], args=argv[1:], env=env, cwd=cwd)

    @staticmethod
    def _describe(server: Any) -> str:
        if isinstance(server, str):
            return server
        if isinstance(server, (list, tuple)):
            return shlex.join(str(a) for a in server)
        return " ".join([server.command, *server.args])

    # ---- the session, on the private loop ----

    def _connect(self) -> list[Any]:
        listed: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        self._session_task = asyncio.run_coroutine_threadsafe(self._hold_session(listed), self._loop)
        try:
            return listed.result(self.connect_timeout)
        except concurrent.futures.TimeoutError:
            raise ConnectionError(f"could not connect to the MCP server {self.name!r} and list its tools within "
                                  f"{self.connect_timeout:g}s") from None
        except Exception as e:
            raise ConnectionError(f"could not connect to the MCP server {self.name!r}: {_explain(e)}") from e

    async def _hold_session(self, listed: concurrent.futures.Future[list[Any]]) -> None:
        """Owns the client for its whole life (anyio scopes must be entered and left in one task)."""
        from mcp import Client

        self._closing = asyncio.Event()
        try:
            async with AsyncExitStack() as stack:
                client = await stack.enter_async_context(Client(self.target))
                specs: list[Any] = []
                cursor = None
                while True:
                    page = await client.list_tools(cursor=cursor)
                    specs += page.tools
                    cursor = page.next_cursor
                    if not cursor:
                        break
                self._client = client
                listed.set_result(specs)
                await self._closing.wait()
        except BaseException as e:
            if not listed.done():
                listed.set_exception(e if isinstance(e, Exception) else ConnectionError(repr(e)))
            elif not self._closing.is_set():
                self._lost = _explain(e)
            if not isinstance(e, Exception):
                raise
        finally:
            self._client = None

    async def _request(self, name: str, args: dict[str, Any]) -> ToolResult:
        if self._client is None:
            return self._gone()
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED, INVALID_PARAMS, REQUEST_TIMEOUT

        try:
            result = await self._client.call_tool(name, args, read_timeout_seconds=self.timeout)
        except MCPError as e:
            if e.code == REQUEST_TIMEOUT:
                return self._timed_out(name)
            if e.code == CONNECTION_CLOSED:
                return self._gone(e.message)
            kind = "invalid_arguments" if e.code == INVALID_PARAMS else "remote_error"
            return ToolResult.failure(f"the MCP server refused the call of {name!r}: {e.message}", kind)
        except TimeoutError:
            return self._timed_out(name)
        except Exception as e:  # noqa: BLE001 - a broken transport is a result, never a crash of the loop
            return self._gone(_explain(e)) if self._client is None or _is_closed(e) else \
                ToolResult.failure(f"calling {name!r} on the MCP server {self.name!r} failed: {_explain(e)}",
                                   "remote_error")
        return from_call_result(result)

    def _call_sync(self, name: str, args: dict[str, Any]) -> ToolResult:
        if not self._loop.is_running():
            return self._gone("the toolkit is closed")
        future = asyncio.run_coroutine_threadsafe(self._request(name, args), self._loop)
        try:
            return future.result(self.timeout + 10.0)  # the SDK's own timeout fires first
        except concurrent.futures.TimeoutError:
            future.cancel()
            return self._timed_out(name)

    async def _call_async(self, name: str, args: dict[str, Any]) -> ToolResult:
        if not self._loop.is_running():
            return self._gone("the toolkit is closed")
        future = asyncio.run_coroutine_threadsafe(self._request(name, args), self._loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout + 10.0)
        except TimeoutError:
            future.cancel()
            return self._timed_out(name)

    def _timed_out(self, name: str) -> ToolResult:
        return ToolResult.failure(f"the tool {name!r} did not answer within {self.timeout:g}s (MCP server "
                                  f"{self.name!r})", "timeout")

    def _gone(self, why: str | None = None) -> ToolResult:
        why = why or self._lost or "the connection is closed"
        return ToolResult.failure(f"the MCP server {self.name!r} is gone ({why}); its tools cannot be called",
                                  "remote_error")

    @property
    def connected(self) -> bool:
        return self._client is not None

    def close(self) -> None:
        """End the session (and a stdio server's process); idempotent."""
        if self._loop.is_closed():
            return
        if self._closing is not None and self._session_task is not None:
            self._loop.call_soon_threadsafe(self._closing.set)
            try:
                self._session_task.result(15.0)
            except Exception:  # noqa: BLE001, S110 - the session already ended with an error; nothing to close
                pass
        elif self._session_task is not None:
            self._session_task.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MCPToolkit({self.name!r}, tools={self.names})"


def from_call_result(result: Any) -> ToolResult:
    """An MCP CallToolResult as a ToolResult: the text blocks (other blocks described), or the structured
    content when it is a JSON object and the text is its serialization (or absent); on `isError` the text is
    the error, with our error type from `_meta` when present."""
    parts: list[str] = []
    for block in result.content or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} ({block.mime_type}), {len(block.data)} base64 characters]")
        elif kind == "resource":
            inner = block.resource
            parts.append(getattr(inner, "text", None) or f"[resource {inner.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{kind} content]")
    text = "\n".join(parts)
    structured = result.structured_content
    if result.is_error:
        meta = result.meta or {}
        error_type = meta.get(ERROR_TYPE_META) if isinstance(meta, dict) else None
        allowed = ("invalid_arguments", "tool_error", "unknown_tool", "timeout", "remote_error")
        body, error = _split_error(text)
        return ToolResult.failure(error or "the tool failed (no message)",
                                  error_type if error_type in allowed else "tool_error", content=body)
    if isinstance(structured, dict) and (not text or _json_equal(text, structured)):
        return ToolResult.success(structured)  # the text only serializes it (as the MCP specification advises)
    return ToolResult.success(text)


def _json_equal(text: str, value: Any) -> bool:
    try:
        return json.loads(text) == value
    except ValueError:
        return False


def _split_error(text: str) -> tuple[str | None, str]:
    """Our server writes ToolResult.to_text() ("[content\n]Error: message"): split it back into content and
    message. Text in another shape is all message."""
    if text.startswith("Error: "):
        return None, text[len("Error: "):]
    body, sep, error = text.rpartition("\nError: ")
    return (body, error) if sep else (None, text)


def _local_name(name: str, taken: list[str]) -> str:
    """An MCP tool name as a Tool name: characters outside [A-Za-z0-9_-] become '_', at most 64 characters,
    a numeric suffix if that collides."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "tool"
    out, k = base, 1
    while out in taken:
        k += 1
        out = f"{base[:60]}_{k}"
    return out


def _explain(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_explain(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _is_closed(e: BaseException) -> bool:
    import anyio

    return isinstance(e, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream,
                          ConnectionError, EOFError, BrokenPipeError))


_UNDERSTOOD = {"type", "properties", "required", "additionalProperties", "items", "enum", "anyOf", "description",
               "default", "title", "$schema"}


def _validator_understands(schema: Any) -> bool:
    """Whether our small validator checks everything this schema says (else the server is the judge)."""
    if isinstance(schema, list):
        return all(_validator_understands(s) for s in schema)
    if not isinstance(schema, dict):
        return True
    if set(schema) - _UNDERSTOOD:
        return False
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    if any(k not in ("string", "integer", "number", "boolean", "null", "array", "object") for k in kinds):
        return False
    nested = [*schema.get("properties", {}).values(), schema.get("items"), *(schema.get("anyOf") or [])]
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        nested.append(extra)
    return all(_validator_understands(s) for s in nested if s is not None)


__all__ = ["MCPServerThread", "MCPTool", "MCPToolkit", "create_mcp_server", "from_call_result", "mcp_http_app",
           "serve_mcp_http", "serve_mcp_stdio", "to_call_result"]
