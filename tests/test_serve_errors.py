"""Bad input and limits: every case is a 4xx with an OpenAI-shaped error that says what was wrong, and the
server answers the next good request. Also API keys (401), unknown model/route (404), a 10 MB body (413),
prompts over the context (400 naming the limit), and a full queue (429 with Retry-After, no hang)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import openai
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.serve.backend import ServeConfig
from internlm_jax.serve.testing import serve_in_thread, tiny_engine

KEY = "sk-test-123"
MAX_LEN = 128
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)
    engine = tiny_engine(lm, max_batch=8, max_len=MAX_LEN)
    cfg = ServeConfig(model_name="tiny", api_keys=(KEY, "sk-other"), max_queue=0,
                      cors_origins=("http://chat.example",))
    with serve_in_thread(engine, lm.tokenizer, cfg) as (url, backend):
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield {"url": url, "http": http, "backend": backend}
        http.close()
    engine.shutdown()


def _error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for n in needles:
        assert n in err["message"], (n, err["message"])
    return err


def _good(env) -> None:
    r = env["http"].post("/v1/chat/completions", json=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def test_api_keys(env):
    url = env["url"]
    _error(httpx.post(url + "/v1/chat/completions", json=GOOD), 401, "missing API key", "Bearer")
    _error(httpx.post(url + "/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer nope"}), 401,
           "invalid API key")
    _error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic abc"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key="sk-other", max_retries=0)
    assert ok.chat.completions.create(**GOOD).usage.completion_tokens == 1
    assert httpx.get(url + "/health").status_code == 200
    _good(env)


def test_metrics_and_docs_need_the_key(env):
    url, backend = env["url"], env["backend"]
    for path in ("/metrics", "/docs", "/openapi.json"):
        _error(httpx.get(url + path), 401, "missing API key")
        _error(httpx.get(url + path, headers={"Authorization": "Bearer nope"}), 401, "invalid API key")
        assert env["http"].get(path).status_code == 200, path
    assert "/v1/chat/completions" in env["http"].get("/openapi.json").json()["paths"]
    assert "swagger" in env["http"].get("/docs").text.lower()
    config = backend.config
    backend.config = dataclasses.replace(config, open_metrics=True)  # --open-metrics: for a scraper
    try:
        assert httpx.get(url + "/metrics").status_code == 200
        _error(httpx.get(url + "/openapi.json"), 401, "missing API key")
    finally:
        backend.config = config


@pytest.mark.parametrize("case", [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, ["not valid JSON"]),
    ("not an object", b'[1, 2, 3]', 400, ["must be a JSON object"]),
    ("empty body", b"", 400, ["empty"]),
    ("max_tokens type", dict(GOOD, max_tokens="ten"), 400, ["max_tokens", "valid integer"]),
    ("messages type", dict(GOOD, messages="hello"), 400, ["messages", "valid list"]),
    ("temperature type", dict(GOOD, temperature="hot"), 400, ["temperature", "valid number"]),
    ("n bool", dict(GOOD, n=True), 400, ["'n'"]),
    ("negative max_tokens", dict(GOOD, max_tokens=-5), 400, ["'max_tokens' must be >= 1", "-5"]),
    ("zero max_completion_tokens", dict(GOOD, max_completion_tokens=0), 400, ["max_completion_tokens"]),
    ("temperature range", dict(GOOD, temperature=3.5), 400, ["'temperature' must be in [0.0, 2.0]", "3.5"]),
    ("top_p range", dict(GOOD, top_p=0), 400, ["top_p"]),
    ("penalty range", dict(GOOD, presence_penalty=-3), 400, ["presence_penalty", "[-2.0, 2.0]"]),
    ("empty messages", dict(GOOD, messages=[]), 400, ["'messages' is empty"]),
    ("unknown role", dict(GOOD, messages=[{"role": "robot", "content": "x"}]), 400,
     ["messages[0].role", "'system', 'developer', 'user', 'assistant' or 'tool'"]),
    ("missing role", dict(GOOD, messages=[{"content": "x"}]), 400, ["messages[0].role", "required"]),
    ("image content", dict(GOOD, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, ["text-only"]),
    ("top_logprobs alone", dict(GOOD, top_logprobs=2), 400, ["needs 'logprobs': true"]),
    ("n too big", dict(GOOD, n=1000), 400, ["'n' must be in [1, 64]"]),
    ("stop type", dict(GOOD, stop=[1, 2]), 400, ["'stop' must be a string or a list of strings"]),
    ("logit_bias", dict(GOOD, logit_bias={"5": 10}), 400, ["logit_bias"]),
    ("bad tool_choice", dict(GOOD, tool_choice="always"), 400, ["tool_choice"]),
    ("bad response_format", dict(GOOD, response_format={"type": "xml"}), 400, ["response_format"]),
    ("stream_options without stream", dict(GOOD, stream_options={"include_usage": True}), 400, ["stream_options"]),
    ("unknown model", dict(GOOD, model="gpt-4o"), 404, ["'gpt-4o' does not exist", "'tiny'"]),
], ids=lambda c: c[0])
def test_bad_chat_requests(env, case):
    _, body, status, needles = case
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    _error(env["http"].post("/v1/chat/completions", **kw), status, *needles)
    _good(env)


@pytest.mark.parametrize("case", [
    ("prompt type", {"prompt": 5}, ["'prompt' must be a string"]),
    ("empty prompt list", {"prompt": []}, ["empty list"]),
    ("mixed prompt list", {"prompt": ["a", [1, 2]]}, ["'prompt' must be"]),
    ("token outside vocab", {"prompt": [1, 5000]}, ["token id 5000", "[0, 1024)"]),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}, ["'max_tokens' must be >= 0"]),
    ("logprobs range", {"prompt": "hi", "logprobs": 9}, ["'logprobs' must be in [0, 5]"]),
    ("suffix", {"prompt": "hi", "suffix": "x"}, ["suffix"]),
], ids=lambda c: c[0])
def test_bad_completion_requests(env, case):
    _, body, needles = case
    _error(env["http"].post("/v1/completions", json=dict({"model": "tiny"}, **body)), 400, *needles)
    _good(env)


def test_context_limits(env):
    http = env["http"]
    long_text = "the quick brown fox " * 100  # well over 128 tokens
    err = _error(http.post("/v1/chat/completions", json=dict(GOOD, messages=[{"role": "user", "content": long_text}])),
                 400, f"maximum context length is {MAX_LEN} tokens", "resulted in")
    assert err["code"] == "context_length_exceeded"
    _error(http.post("/v1/completions", json={"model": "tiny", "prompt": [1] * 130, "max_tokens": 1}), 400,
           f"maximum context length is {MAX_LEN} tokens", "130")
    _error(http.post("/v1/completions", json={"model": "tiny", "prompt": [1] * 100, "max_tokens": 50}), 400,
           "you requested 150 tokens (100 in the prompt, 50 in the completion)")
    _error(http.post("/v1/completions", json={"model": "tiny", "prompt": [1] * 129, "max_tokens": 0, "echo": True,
                                              "logprobs": 1}), 400, "prompt 0 has 129 tokens")
    _good(env)


def test_huge_body_and_unknown_route(env):
    http = env["http"]
    body = json.dumps(dict(GOOD, messages=[{"role": "user", "content": "x" * (10 << 20)}])).encode()
    assert len(body) > 10 << 20
    _error(http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}), 413,
           "larger than the server's limit")
    _good(env)
    _error(http.post("/v1/nothing", json={}), 404, "/v1/nothing")
    _error(http.get("/v1/chat/completions"), 405)
    _good(env)


def test_queue_overflow_is_429_not_a_hang(env):
    """8 decode slots and --max-queue 0: 12 concurrent streams -> 8 run, 4 are refused at once with 429."""
    url = env["url"]

    async def one(client: httpx.AsyncClient) -> tuple[int, str | None, int]:
        body = dict(GOOD, max_tokens=60, stream=True, ignore_eos=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, r.headers.get("retry-after"), 0
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    n += bool(json.loads(line[6:])["choices"] and json.loads(line[6:])["choices"][0]["delta"]
                              .get("content") is not None)
            return 200, None, n

    async def main():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            return await asyncio.wait_for(asyncio.gather(*[one(c) for _ in range(12)]), 120)

    results = asyncio.run(main())
    codes = sorted(r[0] for r in results)
    assert codes.count(429) == 4 and codes.count(200) == 8, codes
    assert all(r[1] == "1" for r in results if r[0] == 429)
    r = env["http"].post("/v1/chat/completions", json=GOOD)
    assert r.status_code == 200
    st = env["backend"].stats()
    assert st["server_active"] == 0 and st["pages_used"] == 0
    refused = env["http"].get("/metrics").text
    assert "internlm_jax_requests_rejected_total 4.0" in refused


def _raw(env, path: str, body: str | bytes) -> httpx.Response:
    data = body.encode() if isinstance(body, str) else body
    return env["http"].post(path, content=data, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("case", [
    ("chat content", "/v1/chat/completions",
     '{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("completion prompt", "/v1/completions", '{"model": "tiny", "max_tokens": 1, "prompt": ["ok", "x\\udfff"]}',
     "prompt[1]"),
    ("tool description", "/v1/chat/completions",
     ('{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
      '"function", "function": {"name": "f", "description": "\\udc00", "parameters": {"type": "object"}}}]}'),
     "tools[0].function.description"),
    ("model", "/v1/chat/completions",
     '{"model": "\\ud83d", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("key", "/v1/chat/completions",
     '{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}',
     "messages[0].\\ud800"),
], ids=lambda c: c[0])
def test_lone_surrogates_are_400(env, case):
    _, path, body, where = case
    err = _error(_raw(env, path, body), 400, "not valid Unicode", where, "lone surrogate")
    assert err["code"] == "invalid_unicode"
    # a proper surrogate pair (an emoji) is fine
    ok = _raw(env, "/v1/chat/completions",
              '{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')
    assert ok.status_code == 200, ok.text


def test_deep_nesting_is_400(env):
    deep = b'{"model": "tiny", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    err = _error(_raw(env, "/v1/chat/completions", deep), 400, "more than 64 levels deep")
    assert err["code"] == "json_too_deep"
    schema: dict = {"type": "object"}
    for _ in range(70):  # parses fine, but over the limit
        schema = {"type": "object", "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    _error(env["http"].post("/v1/chat/completions", json=dict(GOOD, tools=tools)), 400, "64 levels")
    _good(env)


def test_requests_that_never_fit_are_400_not_429(env):
    """8 decode slots + --max-queue 0: n=9 (or 3 prompts x n=3) can never be admitted -> 400 naming the limit."""
    err = _error(env["http"].post("/v1/chat/completions", json=dict(GOOD, n=9)), 400, "n=9",
                 "never holds more than 8", "8 decode slots + --max-queue 0")
    assert err["code"] == "request_exceeds_server_limit" and err["param"] == "n"
    _error(env["http"].post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 3,
                                                     "max_tokens": 1}), 400, "3 prompts x n=3", "9 sequences")
    r = env["http"].post("/v1/chat/completions", json=dict(GOOD, n=8))  # exactly the limit: admitted
    assert r.status_code == 200 and len(r.json()["choices"]) == 8
    _good(env)


@pytest.mark.parametrize("case", [
    ("bad type", {"type": "objekt"}, "'objekt' is not valid"),
    ("bad nested type", {"type": "object", "properties": {"city": {"type": 5}}}, "['properties']['city']"),
    ("required not a list", {"type": "object", "required": "city"}, "'city' is not of type 'array'"),
], ids=lambda c: c[0])
def test_invalid_tool_schema_is_400_naming_the_tool(env, case):
    _, schema, needle = case
    tools = [{"type": "function", "function": {"name": "ok_tool", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    err = _error(env["http"].post("/v1/chat/completions", json=dict(GOOD, tools=tools)), 400,
                 "tools[1] ('get_weather')", "not a valid JSON schema", needle)
    assert err["param"] == "tools[1].function.parameters"
    _good(env)


def test_cors_preflight(env):
    r = httpx.options(env["url"] + "/v1/chat/completions", headers={
        "Origin": "http://chat.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://chat.example"
    r = httpx.options(env["url"] + "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    _good(env)


def test_failed_engine_is_503(env):
    engine = env["backend"].engine
    engine._error = RuntimeError("device lost")  # what the engine loop records when a step raises
    try:
        _error(env["http"].post("/v1/chat/completions", json=GOOD), 503, "engine loop failed", "device lost")
        assert httpx.get(env["url"] + "/health").status_code == 503
    finally:
        engine._error = None
    _good(env)


def test_non_streaming_disconnect_aborts(env, monkeypatch):
    """A client that gives up on a non-streaming request: the server aborts it and frees its pages."""
    runner = env["backend"].engine.runner
    real_run = runner.run

    def slow_run(rows):  # ~20 ms per engine step, so 100 tokens surely outlast the client's 0.5 s
        time.sleep(0.02)
        return real_run(rows)

    monkeypatch.setattr(runner, "run", slow_run)
    before = env["backend"].metrics.aborted._value.get()
    with pytest.raises(httpx.ReadTimeout):
        env["http"].post("/v1/chat/completions", json=dict(GOOD, max_tokens=100, ignore_eos=True), timeout=0.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = env["backend"].stats()
        if env["backend"].metrics.aborted._value.get() == before + 1 and st["server_active"] == 0 \
                and st["pages_used"] == 0:  # the abort itself runs on a worker thread: wait for it
            break
        time.sleep(0.05)
    st = env["backend"].stats()
    assert env["backend"].metrics.aborted._value.get() == before + 1
    assert st["server_active"] == 0 and st["pages_used"] == 0 and st["running"] == 0
    _good(env)
