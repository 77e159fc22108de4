"""The FastAPI app: OpenAI-compatible endpoints, /health, /metrics, and the web chat page at /.

    backend = Backend(engine, tokenizer, ServeConfig(model_name="internlm2-chat-7b"))
    app = create_app(backend)            # serve with uvicorn (see serve/server.py)

Every error is OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`): 400 bad parameters
or prompts over the context, a body nested over MAX_JSON_DEPTH levels, text that is not valid Unicode, a
request larger than the server can ever admit; 401 bad/missing API key (when keys are set: every route but
/health, / and, with ServeConfig.open_metrics, /metrics); 404 unknown model or route; 413 a body over
ServeConfig.max_body_bytes; 429 a full queue that will drain (with Retry-After); 503 a failed engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from internlm_jax.serve.backend import Backend
from internlm_jax.serve.common import ClientGone
from internlm_jax.serve.errors import APIError, bad_request
from internlm_jax.serve.openai_chat import chat_completion
from internlm_jax.serve.openai_completions import completion
from internlm_jax.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_request

log = logging.getLogger("internlm_jax.serve")
STATIC = Path(__file__).parent / "static"
_DRAIN_LIMIT = 256 << 20  # bodies over the limit are read and dropped up to here, so the client sees the 413
MAX_JSON_DEPTH = 64  # nesting of objects/arrays in a request body (tool schemas need a handful)
_SURROGATE = re.compile("[\ud800-\udfff]")


class _StatusCounter:
    """Pure ASGI middleware: counts API responses by endpoint and status (no wrapping of streamed bodies)."""

    def __init__(self, app: Any, backend: Backend):
        self.app, self.backend = app, backend

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.backend.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                            f"(--max-body-mb); send a shorter prompt", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > _DRAIN_LIMIT:
        raise too_big
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            chunks.append(part)
        elif size > _DRAIN_LIMIT:
            break
    if size > limit:
        raise too_big
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object, e.g. {\"model\": ..., \"messages\": [...]}")
    # Decoding and checking a body of megabytes takes milliseconds to seconds: off the event loop, so other
    # streams keep flowing.
    return await asyncio.to_thread(_parse_body, raw)


def _parse_body(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        raise _too_deep() from None
    check_json_text(body)
    return body


def _too_deep() -> APIError:
    return bad_request(f"the request body nests JSON objects/arrays more than {MAX_JSON_DEPTH} levels deep; "
                       "send a flatter body", code="json_too_deep")


def _where(path: list[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, str):  # a key may itself hold a surrogate: escape it so the error can be sent
            part = part.encode("utf-8", "backslashreplace").decode("utf-8")
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "the body"


def check_json_text(body: Any) -> None:
    """400 if a decoded body nests deeper than MAX_JSON_DEPTH or holds a string that is not valid Unicode.

    JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python decodes it to a str that cannot be encoded
    as UTF-8, which the tokenizer (and any UTF-8 output) would fail on. Iterative: no recursion.
    """
    stack: list[tuple[Any, list[Any]]] = [(body, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            m = _SURROGATE.search(value)
            if m:
                raise bad_request(
                    f"{_where(path)} is not valid Unicode: it holds the lone surrogate "
                    f"{m.group().encode('unicode_escape').decode()} at character {m.start()}; send text as UTF-8 "
                    "(a \\ud800-\\udfff escape must be one half of a high+low surrogate pair)",
                    param=_where(path) if path else None, code="invalid_unicode")
            continue
        if isinstance(value, (dict, list)):
            if len(path) >= MAX_JSON_DEPTH:
                raise _too_deep()
            if isinstance(value, dict):
                for k, v in value.items():
                    stack.append((k, path + [k]))
                    stack.append((v, path + [k]))
            else:
                stack.extend((v, path + [i]) for i, v in enumerate(value) if isinstance(v, (str, dict, list)))


def _check_key(backend: Backend, request: Request) -> None:
    keys = backend.config.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send it as the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    token = token.strip()
    if not any(secrets.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError(401, "invalid API key: it is not one of the server's keys (--api-keys, --api-keys-file or "
                            "$INTERNLM_JAX_API_KEYS)", code="invalid_api_key")


def create_app(backend: Backend) -> FastAPI:
    cfg = backend.config
    # /docs and /openapi.json are served below, behind the API key when keys are set.
    app = FastAPI(title="internlm-jax", summary="OpenAI-compatible InternLM2 server", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.backend = backend
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(_StatusCounter, backend=backend)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"{exc.detail}: {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return APIError(exc.status_code, msg, type_="invalid_request_error").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(f"invalid request: {exc.errors()[:1]}").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}").response()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, why = backend.healthy()
        return JSONResponse({"status": "ok" if ok else "error", "detail": why, "model": cfg.model_name,
                             "random_weights": cfg.random_weights}, status_code=200 if ok else 503)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        _check_key(backend, request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        _check_key(backend, request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="internlm-jax - API docs")

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not backend.config.open_metrics:
            _check_key(backend, request)
        body = await asyncio.to_thread(backend.metrics.render)  # engine.stats() waits for a step in flight
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _check_key(backend, request)
        card = {"id": cfg.model_name, "object": "model", "created": int(backend.started), "owned_by": "internlm-jax",
                "root": cfg.model_name, "parent": None, "max_model_len": backend.max_model_len,
                "random_weights": cfg.random_weights}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _check_key(backend, request)
        req = parse_request(ChatCompletionRequest, await _read_json(request, cfg.max_body_bytes))
        try:
            return await chat_completion(backend, req, request)
        except ClientGone:
            return Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _check_key(backend, request)
        req = parse_request(CompletionRequest, await _read_json(request, cfg.max_body_bytes))
        try:
            return await completion(backend, req, request)
        except ClientGone:
            return Response(status_code=499)

    return app


__all__ = ["create_app"]
