"""Tool server + RemoteToolkit round trip through a real uvicorn server on 127.0.0.1 (a free port)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

import httpx
import pytest
from fastapi import FastAPI

from internlm_jax.agent import (
    Agent,
    OpenAIChatBackend,
    ScriptedBackend,
    ToolError,
    Toolkit,
    ToolResult,
    calculator_tool,
    tool,
)
from internlm_jax.agent.backends import INTERPRETER_FUNCTION, as_protocol_text
from internlm_jax.agent.tool_server import RemoteToolkit, ToolServer, create_tool_app


@tool
def convert(value: float, unit: Literal["km", "mi"], precision: Annotated[int, "Decimal places"] = 2) -> dict:
    """Convert a distance to the other unit."""
    if value < 0:
        raise ToolError("distances cannot be negative")
    out = value * 0.621371 if unit == "km" else value / 0.621371
    return {"value": round(out, precision), "unit": "mi" if unit == "km" else "km"}


@tool
async def echo(text: str, times: int = 1) -> str:
    """Repeat a text."""
    await asyncio.sleep(0)
    return " ".join([text] * times)


@pytest.fixture(scope="module")
def server():
    toolkit = Toolkit([convert, echo, calculator_tool])
    with ToolServer(create_tool_app(toolkit)) as url:
        assert url.startswith("http://127.0.0.1:")
        yield url, toolkit


def test_listing_and_openapi(server):
    url, toolkit = server
    listed = httpx.get(f"{url}/tools").json()["tools"]
    assert listed == [{**t.to_function(), "path": f"/tools/{t.name}"} for t in toolkit]
    spec = httpx.get(f"{url}/openapi.json").json()
    for t in toolkit:
        op = spec["paths"][f"/tools/{t.name}"]["post"]
        assert op["operationId"] == t.name and op["description"] == t.description
        assert op["requestBody"]["content"]["application/json"]["schema"] == t.parameters
        assert set(op["responses"]) >= {"200", "422"}


def test_remote_toolkit_round_trip(server):
    url, toolkit = server
    remote = RemoteToolkit(url)
    assert remote.names == ["convert", "echo", "calculator"]
    assert remote.to_openai() == toolkit.to_openai()
    assert remote["convert"]({"value": 10, "unit": "km"}) == ToolResult(ok=True, content={"value": 6.21, "unit": "mi"})
    assert remote["convert"]({"value": -1, "unit": "km"}) == ToolResult(
        ok=False, error="distances cannot be negative", error_type="tool_error")
    assert remote["echo"]({"text": "hi", "times": 3}).content == "hi hi hi"
    assert remote.call("calculator", '{"expression": "2 ^ 16"}').content == 65536
    # refused locally by the schema the server published, before any request
    assert remote["convert"]({"value": "ten", "unit": "km"}).error == (
        "invalid arguments for 'convert': arguments.value: expected number, got string 'ten'")

    async def concurrently():
        return await asyncio.gather(*(remote.acall("echo", {"text": str(i)}) for i in range(5)))

    assert [r.content for r in asyncio.run(concurrently())] == ["0", "1", "2", "3", "4"]


def test_server_side_errors(server):
    url, _ = server
    r = httpx.post(f"{url}/tools/convert", json={"value": 1, "unit": "parsec"})
    assert r.status_code == 422 and r.json() == ToolResult(
        ok=False, error="invalid arguments for 'convert': arguments.unit: 'parsec' is not one of ['km', 'mi']",
        error_type="invalid_arguments").to_dict()
    r = httpx.post(f"{url}/tools/nope", json={})
    assert r.status_code == 404 and r.json()["error"] == "unknown tool 'nope'; available: convert, echo, calculator"
    r = httpx.post(f"{url}/tools/echo", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("the request body is not JSON")


def test_agent_over_remote_tools(server):
    url, _ = server
    backend = ScriptedBackend([('<|action_start|><|plugin|>\n{"name": "convert", "parameters": '
                                '{"value": 42.195, "unit": "km", "precision": 1}}<|action_end|>'),
                               "A marathon is 26.2 miles."])
    run = Agent(backend, RemoteToolkit(url)).chat("How many miles is a marathon?")
    assert run.answer == "A marathon is 26.2 miles."
    assert run.messages[-2] == {"role": "tool", "tool_call_id": "call_0", "name": "convert",
                                "content": json.dumps({"value": 26.2, "unit": "mi"})}


def test_unreachable_server_is_a_clear_error():
    with ToolServer(create_tool_app([echo])) as url:
        remote = RemoteToolkit(url)
    result = remote["echo"]({"text": "x"})  # the server is gone now
    assert result.error_type == "remote_error" and result.error.startswith(
        f"could not reach the tool server at {url}/tools/echo")
    with pytest.raises(ConnectionError, match="could not list the tools"):
        RemoteToolkit(url)


def test_agent_over_an_openai_compatible_chat_endpoint(server):
    """OpenAIChatBackend: tools travel in the OpenAI `tools` field, the structured reply comes back as
    tool_calls, tool results go back as `tool` messages. The endpoint is a stand-in replaying two replies."""
    tools_url, _ = server
    replies = [
        {"role": "assistant", "content": "Converting.", "tool_calls": [
            {"id": "srv_0", "type": "function",
             "function": {"name": "convert", "arguments": '{"value": 42.195, "unit": "km", "precision": 1}'}}]},
        {"role": "assistant", "content": "A marathon is 26.2 miles."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "srv_1", "type": "function", "function": {"name": "python", "arguments": '{"code": "1+1"}'}}]},
    ]
    requests: list[dict] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(body: dict) -> dict:
        requests.append(body)
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": replies[len(requests) - 1], "finish_reason": "stop"}]}

    with ToolServer(app) as chat_url:
        backend = OpenAIChatBackend(f"{chat_url}/v1", "internlm2-chat", temperature=0.0)
        remote = RemoteToolkit(tools_url)
        run = Agent(backend, remote).chat("How many miles is a marathon?")
        code_call = backend.complete([{"role": "user", "content": "2?"}], [], interpreter=True)
        with pytest.raises(RuntimeError, match="answered HTTP 404"):
            OpenAIChatBackend(f"{chat_url}/nope", "m").complete([{"role": "user", "content": "x"}], [])
    assert run.answer == "A marathon is 26.2 miles."
    assert [r["tools"] for r in requests[:2]] == [remote.to_openai()] * 2
    assert requests[0] == {"model": "internlm2-chat", "temperature": 0.0, "tools": remote.to_openai(),
                           "messages": [{"role": "user", "content": "How many miles is a marathon?"}]}
    assert requests[1]["messages"][1:] == [
        {"role": "assistant", "content": "Converting.", "tool_calls": [
            {"id": "call_0", "type": "function",
             "function": {"name": "convert", "arguments": '{"value": 42.195, "unit": "km", "precision": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "name": "convert", "content": '{"value": 26.2, "unit": "mi"}'},
    ]
    # no interpreter switch in the Chat Completions API: the interpreter is offered as a function "python"
    assert requests[2]["tools"] == [INTERPRETER_FUNCTION]
    assert code_call == '<|action_start|><|plugin|>\n{"name": "python", "parameters": {"code": "1+1"}}<|action_end|>'


def test_protocol_text_of_a_structured_reply():
    text = as_protocol_text("Let me see.", [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"y": "é"}}}])
    assert text == ('Let me see.<|action_start|><|plugin|>\n{"name": "f", "parameters": {"x": 1}}<|action_end|>'
                    '<|action_start|><|plugin|>\n{"name": "g", "parameters": {"y": "é"}}<|action_end|>')
