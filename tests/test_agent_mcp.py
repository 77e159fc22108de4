"""MCP with the official `mcp` SDK on both sides: the SDK's client against our server (streamable HTTP on
127.0.0.1 and stdio through `internlm-jax tools serve --mcp`), and our agent against small servers written with
the SDK's `MCPServer` here. The agent's model is a `ScriptedBackend` (its replies are FORCED, fixed in each
test); the MCP traffic, the tools and the loop are real. Every subprocess and call has a timeout."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field

mcp = pytest.importorskip("mcp", reason="the MCP tests need the official mcp SDK (pip install 'internlm-jax[agents]')")

from mcp import Client, MCPError, StdioServerParameters
from mcp.server import MCPServer

from internlm_jax.agent import Agent, ScriptedBackend, ToolError, Toolkit, ToolResult, calculator_tool, tool
from internlm_jax.agent import cli as agent_cli
from internlm_jax.agent.mcp import ERROR_TYPE_META, MCPServerThread, MCPToolkit, create_mcp_server

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}  # the SDK gives a stdio server a minimal environment
HAS_BWRAP = shutil.which("bwrap") is not None


@tool
def convert(value: float, unit: Literal["km", "mi"]) -> dict:
    """Convert a distance to the other unit.

    Args:
        value: The distance.
        unit: Its unit.
    """
    if value < 0:
        raise ToolError("distances cannot be negative")
    return {"value": round(value * 0.621371 if unit == "km" else value / 0.621371, 2),
            "unit": "mi" if unit == "km" else "km"}


@tool
async def echo(text: str, times: int = 1) -> str:
    """Repeat a text."""
    await asyncio.sleep(0)
    return " ".join([text] * times)


def call(text_name: str, arguments: dict) -> str:
    import json

    return f'<|action_start|><|plugin|>\n{json.dumps({"name": text_name, "parameters": arguments})}<|action_end|>'


def run_client(target, body, timeout: float = 60.0):
    """Run `body(client)` with the SDK's Client connected to `target`, bounded by `timeout`."""
    async def main():
        async with Client(target) as client:
            return await body(client)

    async def bounded():
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def our_server():
    toolkit = Toolkit([convert, echo, calculator_tool])
    with MCPServerThread(create_mcp_server(toolkit)) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/mcp")
        yield url, toolkit


# ---- the SDK's client against our server ------------------------------------------------------------------

def test_sdk_client_lists_and_calls_our_tools_over_http(our_server):
    url, toolkit = our_server

    async def body(client):
        listed = await client.list_tools()
        ok = await client.call_tool("convert", {"value": 10, "unit": "km"})
        text = await client.call_tool("echo", {"text": "hi", "times": 2})
        bad = await client.call_tool("convert", {"value": "ten", "unit": "km"})
        failed = await client.call_tool("convert", {"value": -1, "unit": "km"})
        with pytest.raises(MCPError, match="unknown tool 'nope'; available: convert, echo, calculator"):
            await client.call_tool("nope", {})
        return listed, ok, text, bad, failed, client.server_info

    listed, ok, text, bad, failed, info = run_client(url, body)
    assert info.name == "internlm-jax"
    # the schemas are exactly the ones our tools derive from their type hints and docstrings
    assert [{"name": t.name, "description": t.description, "parameters": t.input_schema} for t in listed.tools] \
        == toolkit.to_functions()
    assert listed.tools[0].input_schema["properties"]["unit"] == {"type": "string", "enum": ["km", "mi"],
                                                                 "description": "Its unit."}
    assert not ok.is_error and ok.content[0].text == '{"value": 6.21, "unit": "mi"}'
    assert ok.structured_content == {"value": 6.21, "unit": "mi"}
    assert not text.is_error and text.content[0].text == "hi hi" and text.structured_content is None
    # bad arguments and a failing tool are tool results with isError, so a model can read and correct them
    assert bad.is_error and bad.meta[ERROR_TYPE_META] == "invalid_arguments"
    assert bad.content[0].text == ("Error: invalid arguments for 'convert': arguments.value: expected number, "
                                   "got string 'ten'")
    assert failed.is_error and failed.content[0].text == "Error: distances cannot be negative"
    assert failed.meta[ERROR_TYPE_META] == "tool_error"


def test_our_client_round_trips_our_server(our_server):
    url, toolkit = our_server
    with MCPToolkit(url, timeout=30) as remote:
        assert remote.names == toolkit.names and remote.to_openai() == toolkit.to_openai()
        assert remote["convert"]({"value": 10, "unit": "km"}) == ToolResult.success({"value": 6.21, "unit": "mi"})
        assert remote["convert"]({"value": -1, "unit": "km"}) == ToolResult.failure(
            "distances cannot be negative", "tool_error")
        assert remote.call("calculator", '{"expression": "2 ^ 10"}') == ToolResult.success("1024")
        # refused here by the server's published schema, before any request
        assert remote["convert"]({"value": 1, "unit": "parsec"}).error_type == "invalid_arguments"
        assert remote.call("nope", {}).error_type == "unknown_tool"

        async def concurrently():
            return await asyncio.gather(*(remote.acall("echo", {"text": str(i)}) for i in range(5)))

        assert [r.content for r in asyncio.run(concurrently())] == ["0", "1", "2", "3", "4"]
    assert not remote.connected
    assert remote["echo"]({"text": "x"}).error_type == "remote_error"  # closed: a result, not a crash


def test_sdk_client_over_stdio_through_the_cli():
    """`internlm-jax tools serve --mcp --transport stdio` as a subprocess of the SDK's stdio client; with bwrap
    the interpreter is served too and runs in its sandbox (own PID namespace, no host files)."""
    tools = "calculator,python" if HAS_BWRAP else "calculator"
    params = StdioServerParameters(command=sys.executable, args=["-m", "internlm_jax.cli", "tools", "serve", "--mcp",
                                                                 "--transport", "stdio", "--tools", tools],
                                   env=CHILD_ENV)

    async def body(client):
        listed = await client.list_tools()
        results = [await client.call_tool("calculator", {"expression": "6 * 7"})]
        if HAS_BWRAP:
            for code in ("import os\nx = 41\nos.getpid()", "x + 1", "open('/etc/hostname').read()"):
                results.append(await client.call_tool("python_interpreter", {"code": code}))
        return listed, results

    listed, results = run_client(params, body, timeout=120)
    assert [t.name for t in listed.tools] == (["calculator", "python_interpreter"] if HAS_BWRAP else ["calculator"])
    assert results[0].content[0].text == "42" and not results[0].is_error
    if not HAS_BWRAP:
        pytest.skip("bwrap is not installed: the sandboxed interpreter part of this test did not run")
    pid, state, denied = results[1:]
    assert int(pid.content[0].text) < 10  # a fresh PID namespace: the sandbox, not a host process
    assert state.content[0].text == "42"  # one stateful session across calls
    assert denied.is_error and "PermissionError" in denied.content[0].text


# ---- our agent against servers written with the SDK --------------------------------------------------------

def sdk_server() -> MCPServer:
    server = MCPServer("weather-test")

    @server.tool()
    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        """Current temperature of a city."""
        return f"{city}: {21 if unit == 'C' else 70} {unit}"

    @server.tool()
    def repeat(text: str, times: Annotated[int, Field(ge=1, le=3)]) -> str:
        """Repeat a text 1 to 3 times."""
        return text * times

    @server.tool()
    async def hang(seconds: float = 60.0) -> str:
        """A remote tool that never answers in time."""
        await asyncio.sleep(seconds)
        return "too late"

    return server


def test_agent_uses_an_sdk_server_over_http_and_survives_a_hanging_tool():
    """The model's replies are FORCED (ScriptedBackend): call get_weather, then the hanging tool, then answer.
    The hanging call is cut at the toolkit's 1 s timeout and comes back to the model as a result."""
    backend = ScriptedBackend([
        "Checking." + call("get_weather", {"city": "Lima"}),
        call("hang", {}),
        "It is 21 C in Lima.",
    ])
    with MCPServerThread(sdk_server()) as url, MCPToolkit(url, timeout=1.0) as toolkit:
        assert toolkit.names == ["get_weather", "repeat", "hang"]
        schema = toolkit["get_weather"].parameters
        assert schema["required"] == ["city"] and schema["properties"]["unit"]["enum"] == ["C", "F"]
        start = time.monotonic()
        run = Agent(backend, toolkit, max_turns=4).chat("Weather in Lima?")
        elapsed = time.monotonic() - start
        # the session is still usable after the timeout
        assert toolkit["get_weather"]({"city": "Oslo", "unit": "F"}).content == "Oslo: 70 F"
        # a schema keyword our validator does not check (maximum): the SDK server judges the arguments
        assert toolkit["repeat"]({"text": "ab", "times": 2}).content == "abab"
        refused = toolkit["repeat"]({"text": "ab", "times": 5})
        assert not refused.ok and "less than or equal to 3" in refused.error
    assert run.answer == "It is 21 C in Lima." and run.error is None
    results = [e for e in run.events if e.type == "tool_result"]
    assert [r.name for r in results] == ["get_weather", "hang"]
    assert results[0].result == ToolResult.success("Lima: 21 C")
    assert results[1].result.error_type == "timeout" and "did not answer within 1s" in results[1].content
    assert elapsed < 30  # cut at the timeout, not after the tool's 60 s
    # the timeout went back to the model as the environment turn of the next call
    assert backend.calls[2]["messages"][-1]["content"].startswith("Error: the tool 'hang' did not answer")


def test_agent_over_stdio_sdk_server_that_dies(tmp_path):
    """An SDK server started by MCPToolkit over stdio exits in the middle of a call (os._exit): that call and
    the next come back as `remote_error` results and the loop goes on to the (FORCED) answer."""
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent('''
        import os
        from mcp.server import MCPServer

        server = MCPServer("dies")

        @server.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        @server.tool()
        def crash() -> str:
            """Exit the server process."""
            os._exit(3)

        server.run("stdio")
    '''))
    backend = ScriptedBackend([call("add", {"a": 2, "b": 3}), call("crash", {}), call("add", {"a": 1, "b": 1}),
                               "The server went away; 2 + 3 = 5."])
    with MCPToolkit([sys.executable, str(script)], timeout=20, env=CHILD_ENV) as toolkit:
        assert toolkit["add"].parameters["required"] == ["a", "b"]
        run = Agent(backend, toolkit, max_turns=5).chat("2 + 3?")
    results = [e.result for e in run.events if e.type == "tool_result"]
    assert results[0].ok and results[0].content in ("5", {"result": 5})
    assert [r.error_type for r in results[1:]] == ["remote_error", "remote_error"]
    assert "is gone" in results[2].error
    assert run.answer == "The server went away; 2 + 3 = 5."


def test_connection_errors_are_clear():
    with pytest.raises(ConnectionError, match="could not connect to the MCP server 'http://127.0.0.1:9/mcp'"):
        MCPToolkit("http://127.0.0.1:9/mcp", connect_timeout=20)
    with pytest.raises(ConnectionError, match="could not connect to the MCP server"):
        MCPToolkit([sys.executable, "-c", "import sys; sys.exit(1)"], connect_timeout=20)
    with pytest.raises(ValueError, match="env= and cwd= apply to a stdio server"):
        MCPToolkit("http://127.0.0.1:9/mcp", env={"A": "1"})


# ---- the CLI -----------------------------------------------------------------------------------------------

def test_cli_serves_mcp_over_http():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "internlm_jax.cli", "tools", "serve", "--mcp", "--tools",
                             "calculator", "--port", str(port)], env={**os.environ, **CHILD_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the MCP server did not start within 90 s"
                time.sleep(0.2)
        with MCPToolkit(url, timeout=30) as toolkit:
            assert toolkit.names == ["calculator"]
            assert toolkit["calculator"]({"expression": "sqrt(16) * 2"}).content == "8.0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_errors(capsys):
    assert agent_cli.tools_main(["serve", "--transport", "stdio"]) == 2
    assert "--transport applies to --mcp only" in capsys.readouterr().err
    assert agent_cli.tools_main(["serve", "--mcp", "--tools", "shell"]) == 2
    assert "unknown tool(s) shell" in capsys.readouterr().err
    assert agent_cli.tools_main(["serve", "--mcp", "--tools", ""]) == 2
    assert "name at least one tool" in capsys.readouterr().err


# ---- the same guarantee over our own HTTP tool protocol ---------------------------------------------------

def test_hanging_tool_over_our_http_protocol_is_cut():
    from internlm_jax.agent.tool_server import RemoteToolkit, ToolServer, create_tool_app

    @tool
    async def stall(seconds: float = 3.0) -> str:
        """Answers after the client's 1 s timeout (short, so the server's graceful shutdown is quick)."""
        await asyncio.sleep(seconds)
        return "too late"

    backend = ScriptedBackend([call("stall", {}), "Gave up waiting."])
    with ToolServer(create_tool_app([stall])) as url:
        run = Agent(backend, RemoteToolkit(url, timeout=1.0)).chat("Go")  # cut at 1 s; the tool answers at 3 s
    (result,) = [e.result for e in run.events if e.type == "tool_result"]
    assert result.error_type == "timeout" and result.error == f"the tool server at {url}/tools/stall did not " \
        "answer within 1s"
    assert run.answer == "Gave up waiting."
