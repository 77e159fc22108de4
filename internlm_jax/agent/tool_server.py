"""Tools over HTTP (the AgentLego pattern): a FastAPI server for a toolkit, and a client toolkit for it.

    app = create_tool_app(Toolkit([calculator_tool, get_weather]))   # POST /tools/{name}, GET /tools
    with ToolServer(app) as url:                                       # uvicorn on 127.0.0.1, a free port
        remote = RemoteToolkit(url)
        remote["calculator"]({"expression": "2 ** 10"})                # ToolResult(ok=True, content=1024)

Every tool is one POST route whose request body is the tool's JSON schema (so /openapi.json documents
them all) and whose response is a ToolResult object: 200 when the tool ran (ok true or false), 422 when
the arguments do not fit the schema, 400 when the body is not JSON, 404 for an unknown tool.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from internlm_jax.agent.tools import Tool, Toolkit, ToolResult, _merge

_RESULT_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "content": {}, "error": {"type": ["string", "null"]},
                   "error_type": {"type": ["string", "null"]}},
    "required": ["ok", "content", "error", "error_type"],
}


def create_tool_app(tools: Toolkit | Iterable[Tool | Any], title: str = "internlm-jax tools") -> FastAPI:
    """A FastAPI app with `GET /tools` (the tool list with schemas) and `POST /tools/{name}` per tool."""
    toolkit = tools if isinstance(tools, Toolkit) else Toolkit(tools)
    app = FastAPI(title=title, description="Tools served by internlm-jax; POST a tool's arguments as JSON.")

    @app.get("/tools", summary="List the tools with their JSON-schema parameters")
    async def list_tools() -> dict[str, Any]:
        return {"tools": [{**t.to_function(), "path": f"/tools/{t.name}"} for t in toolkit]}

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    for t in toolkit:
        app.add_api_route(
            f"/tools/{t.name}", _endpoint(t), methods=["POST"], name=t.name, operation_id=t.name,
            summary=(t.description.split("\n", 1)[0] or t.name)[:120], description=t.description,
            tags=["tools"],
            openapi_extra={
                "requestBody": {"required": True, "content": {"application/json": {"schema": t.parameters}}},
                "responses": {"200": {"description": "The tool ran (see ok)",
                                      "content": {"application/json": {"schema": _RESULT_SCHEMA}}},
                              "422": {"description": "The arguments do not fit the schema",
                                      "content": {"application/json": {"schema": _RESULT_SCHEMA}}}},
            })

    @app.post("/tools/{name}", include_in_schema=False)
    async def unknown_tool(name: str) -> JSONResponse:
        result = ToolResult.failure(f"unknown tool {name!r}; available: {', '.join(toolkit.names) or 'none'}",
                                    "unknown_tool")
        return JSONResponse(result.to_dict(), status_code=404)

    return app


def _endpoint(t: Tool) -> Any:
    async def call_tool(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            arguments = json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad = ToolResult.failure(f"the request body is not JSON: {e}", "invalid_arguments")
            return JSONResponse(bad.to_dict(), status_code=400)
        result = await t.acall(arguments)
        status = 422 if result.error_type == "invalid_arguments" else 200
        return JSONResponse(_jsonable(result).to_dict(), status_code=status)

    call_tool.__name__ = f"call_{t.name}"
    return call_tool


def _jsonable(result: ToolResult) -> ToolResult:
    try:
        json.dumps(result.content, allow_nan=False)
        return result
    except (TypeError, ValueError):
        return ToolResult(result.ok, str(result.content), result.error, result.error_type)


# ---- client -----------------------------------------------------------------------------------------------

class RemoteTool(Tool):
    """A tool whose function runs on a tool server; arguments are checked against its schema locally first."""

    def __init__(self, spec: dict[str, Any], url: str, timeout: float, headers: dict[str, str]) -> None:
        super().__init__(spec["name"], spec.get("description", ""), spec["parameters"])
        self.url, self.timeout, self.headers = url, timeout, headers

    @property
    def is_async(self) -> bool:
        return False

    def _invoke(self, args: dict[str, Any]) -> Any:
        try:
            response = httpx.post(self.url, json=args, timeout=self.timeout, headers=self.headers)
        except httpx.TimeoutException:
            return ToolResult.failure(f"the tool server at {self.url} did not answer within {self.timeout:g}s",
                                      "timeout")
        except httpx.HTTPError as e:
            return ToolResult.failure(f"could not reach the tool server at {self.url}: {e!r}", "remote_error")
        return _decode(response)

    async def _ainvoke(self, args: dict[str, Any]) -> Any:
        try:
            async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
                response = await client.post(self.url, json=args)
        except httpx.TimeoutException:
            return ToolResult.failure(f"the tool server at {self.url} did not answer within {self.timeout:g}s",
                                      "timeout")
        except httpx.HTTPError as e:
            return ToolResult.failure(f"could not reach the tool server at {self.url}: {e!r}", "remote_error")
        return _decode(response)

    async def acall(self, arguments: dict[str, Any] | str | None = None, /, **kwargs: Any) -> ToolResult:
        args, bad = self.check(_merge(arguments, kwargs))
        if bad is not None:
            return bad
        return self._wrap(await self._ainvoke(args))


def _decode(response: httpx.Response) -> ToolResult:
    try:
        return ToolResult.from_dict(response.json())
    except (ValueError, TypeError, AttributeError):
        return ToolResult.failure(f"the tool server answered HTTP {response.status_code}: {response.text[:500]}",
                                  "remote_error")


class RemoteToolkit(Toolkit):
    """The tools of a tool server (from its `GET /tools`) as local `Tool` objects."""

    def __init__(self, base_url: str, timeout: float = 60.0, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        try:
            response = httpx.get(f"{self.base_url}/tools", timeout=timeout, headers=headers)
            response.raise_for_status()
            specs = response.json()["tools"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise ConnectionError(f"could not list the tools of {self.base_url} (GET {self.base_url}/tools): "
                                  f"{e!r}; is it an internlm-jax tool server?") from e
        for spec in specs:
            path = spec.get("path", f"/tools/{spec['name']}")
            self.add(RemoteTool(spec, self.base_url + path, timeout, dict(headers or {})))


# ---- running a server -------------------------------------------------------------------------------------

class ToolServer:
    """uvicorn serving an app in a background thread; `with ToolServer(app) as base_url: ...`.

    Binds 127.0.0.1 and a free port unless told otherwise; binding anything but loopback is the caller's
    explicit choice (the tools run with this process's rights). Any ASGI app works (the MCP server's too)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, lifespan: str = "off") -> None:
        import uvicorn

        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan)  # "on" for apps that need it (MCP)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name=f"tool-server-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"the tool server on {self.url} did not start within {timeout:g}s")
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
