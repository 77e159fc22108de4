"""Our tools in LangChain and Lagent, and each framework's agent completing a tool call against our server.

What is FORCED and what is real: a random tiny model never emits a tool call by itself, so the tokens the
engine samples are replaced by a script (`serve.testing.script_engine`, as in test_agent_e2e.py): a prompt
that declares tools (a `system name=<|plugin|>` turn) without a tool result yet is answered with a call of
`add`, one holding the result (an `environment name=<|plugin|>` turn) with the answer. Everything else is
real: LangChain's `create_agent` with `ChatOpenAI` (langchain-openai) over our `/v1/chat/completions` and its
tool-calling, Lagent's `Internlm2Agent` with its InternLM2 protocol over our `/v1/completions`, the tools
running through the adapters, and the prompts our engine receives for the second call (checked to carry the
tool result)."""

from __future__ import annotations

import asyncio
import shutil
from typing import Literal

import pytest
from fixtures import make_tokenizer_dir

from internlm_jax.agent import ToolError, tool

ADD_CALL = 'Let me add.<|action_start|><|plugin|>\n{"name": "add", "parameters": {"a": 2, "b": 3}}<|action_end|>'
ANSWER = "The sum is 5.<|im_end|>"
QUESTION = "What is 2 + 3?"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def convert(value: float, unit: Literal["km", "mi"] = "km") -> dict:
    """Convert a distance to the other unit.

    Args:
        value: The distance.
        unit: Its unit.
    """
    if value < 0:
        raise ToolError("distances cannot be negative")
    return {"value": round(value * 0.621371 if unit == "km" else value / 0.621371, 2)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import internlm_jax as ij
    from internlm_jax.serve.backend import ServeConfig
    from internlm_jax.serve.testing import script_engine, serve_in_thread, tiny_engine

    lm = ij.init("internlm2-tiny", seed=0, tokenizer=make_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    tok = lm.tokenizer
    engine = tiny_engine(lm, max_batch=4, max_len=512)

    def script_for(prompt_ids, request_id):  # FORCED: the model's choice of tokens
        text = tok.decode(prompt_ids)
        if "environment name=<|plugin|>" in text:
            return tok.encode(ANSWER, add_bos=False)
        if "name=<|plugin|>" in text:
            return tok.encode(ADD_CALL, add_bos=False)
        return None

    received = script_engine(engine, script_for)
    with serve_in_thread(engine, tok, ServeConfig(model_name="tiny")) as (url, _):
        yield {"url": url, "tok": tok, "received": received}
    engine.shutdown()


# ---- LangChain --------------------------------------------------------------------------------------------

def test_langchain_tool_from_ours():
    pytest.importorskip("langchain_core", reason="the LangChain adapter needs langchain-core")
    from langchain_core.messages import ToolCall
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from internlm_jax.agent.adapters import to_langchain

    lc = to_langchain(convert)
    assert convert_to_openai_tool(lc) == convert.to_openai()  # the same schema, from the same type hints
    ok = lc.invoke(ToolCall(name="convert", args={"value": 10}, id="c1", type="tool_call"))
    assert ok.content == '{"value": 6.21}' and ok.status == "success"
    assert ok.artifact == {"ok": True, "content": {"value": 6.21}, "error": None, "error_type": None}
    failed = lc.invoke(ToolCall(name="convert", args={"value": -1}, id="c2", type="tool_call"))
    assert failed.status == "error" and failed.content == "Error: distances cannot be negative"
    bad = asyncio.run(lc.ainvoke(ToolCall(name="convert", args={"value": 1, "unit": "ly"}, id="c3",
                                          type="tool_call")))
    assert bad.status == "error"
    assert bad.content == "Error: invalid arguments for 'convert': arguments.unit: 'ly' is not one of ['km', 'mi']"
    assert lc.invoke({"value": 1, "unit": "mi"}) == '{"value": 1.61}'


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_langchain_agent_against_our_server(server):
    """langchain's create_agent + ChatOpenAI pointed at our server; the first reply (the call) and the second
    (the answer) are FORCED, see the module docstring."""
    pytest.importorskip("langchain", reason="the LangChain agent test needs langchain (create_agent)")
    pytest.importorskip("langchain_openai", reason="the LangChain agent test needs langchain-openai")
    from langchain.agents import create_agent
    from langchain_openai import ChatOpenAI

    from internlm_jax.agent.adapters import to_langchain

    tok, received = server["tok"], server["received"]
    start = len(received)
    model = ChatOpenAI(base_url=server["url"] + "/v1", api_key="unused", model="tiny", temperature=0,
                       max_retries=0, timeout=120)
    agent = create_agent(model, [to_langchain(add)])
    out = agent.invoke({"messages": [{"role": "user", "content": QUESTION}]})

    human, call, result, answer = out["messages"]
    assert human.content == QUESTION
    assert call.content == "Let me add." and [(c["name"], c["args"]) for c in call.tool_calls] == [
        ("add", {"a": 2, "b": 3})]
    assert result.type == "tool" and result.content == "5" and result.tool_call_id == call.tool_calls[0]["id"]
    assert answer.content == "The sum is 5." and not answer.tool_calls
    assert len(received) - start == 2
    first, second = (tok.decode(ids) for ids in received[start:])
    assert first.startswith('<s><|im_start|>system name=<|plugin|>\n[{"name": "add", "description": "Add two '
                            'integers."')
    assert second.startswith(first) and second.endswith(
        "<|im_start|>environment name=<|plugin|>\n5<|im_end|>\n<|im_start|>assistant\n")


# ---- Lagent -----------------------------------------------------------------------------------------------

def _lagent():
    return pytest.importorskip(
        "lagent", reason="lagent is not importable: it is in the optional `lagent` extra, not in `dev`, because "
        "lagent 0.2.4 hard-requires streamlit, the jupyter stack and pinned search clients")


def test_lagent_actions_from_ours():
    _lagent()
    from lagent.actions import ActionExecutor
    from lagent.schema import ActionStatusCode

    from internlm_jax.agent.adapters import to_lagent

    action = to_lagent(convert)
    assert action.name == "convert" and not action.is_toolkit
    assert action.description["required"] == ["value"]
    assert action.description["parameters"] == [
        {"name": "value", "type": "FLOAT", "description": "The distance."},
        {"name": "unit", "type": "STRING", "description": "Its unit.", "enum": ["km", "mi"], "default": "km"}]
    executor = ActionExecutor([action])
    ok = executor("convert", {"value": 10})
    assert ok.state == ActionStatusCode.SUCCESS and ok.format_result() == '{"value": 6.21}'
    failed = executor("convert", '{"value": -1}')
    assert failed.state == ActionStatusCode.API_ERROR and failed.errmsg == "Error: distances cannot be negative"
    bad = executor("convert", {"value": "far"})
    assert bad.state == ActionStatusCode.ARGS_ERROR
    assert bad.errmsg == "Error: invalid arguments for 'convert': arguments.value: expected number, got string 'far'"


def test_lagent_interpreter_runs_in_our_sandbox():
    _lagent()
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed: the sandboxed interpreter cannot start")
    from lagent.actions import ActionExecutor
    from lagent.schema import ActionStatusCode

    from internlm_jax.agent import PythonInterpreter
    from internlm_jax.agent.adapters import to_lagent_interpreter

    with PythonInterpreter() as interpreter:
        executor = ActionExecutor([to_lagent_interpreter(interpreter.tool)])
        name = executor.action_names()[0]  # what Internlm2Agent sends the code to, as {"command": code}
        ok = executor(name, {"command": "```python\nimport os\nprint(os.getpid() < 10)\n21 * 2\n```"})
        denied = executor(name, {"command": "open('/etc/hostname').read()"})
    assert ok.state == ActionStatusCode.SUCCESS and ok.format_result() == "True\n42"
    assert denied.state == ActionStatusCode.API_ERROR and "PermissionError" in denied.errmsg


def test_lagent_agent_against_our_server(server):
    """Lagent's Internlm2Agent with its own InternLM2 protocol (short English prompts instead of its long
    Chinese defaults, which would not fit the tiny test engine's 512-token context) over our /v1/completions;
    the call and the answer are FORCED, see the module docstring."""
    _lagent()
    from lagent.actions import ActionExecutor
    from lagent.agents import Internlm2Agent
    from lagent.agents.internlm2_agent import Internlm2Protocol
    from lagent.schema import ActionStatusCode

    from internlm_jax.agent.adapters import lagent_llm, to_lagent

    tok, received = server["tok"], server["received"]
    start = len(received)
    llm = lagent_llm(server["url"] + "/v1", max_new_tokens=64)
    protocol = Internlm2Protocol(meta_prompt="You are a helpful assistant.", plugin_prompt="Tools:\n{prompt}")
    agent = Internlm2Agent(llm, plugin_executor=ActionExecutor([to_lagent(add)]), protocol=protocol, max_turn=3)
    ret = agent.chat(QUESTION)

    assert ret.response == "The sum is 5."
    (action,) = ret.actions
    assert action.type == "add" and action.args == {"a": 2, "b": 3} and action.thought == "Let me add."
    assert action.state == ActionStatusCode.SUCCESS and action.format_result() == "5"
    assert len(received) - start == 2
    first, second = (tok.decode(ids) for ids in received[start:])
    assert first.startswith("<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                            "<|im_start|>system name=<|plugin|>\nTools:\n")
    assert first.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>environment name=<|plugin|>\n5<|im_end|>\n<|im_start|>assistant\n" in second
    assert '<|action_start|><|plugin|>\n{"name": "add", "parameters": {"a": 2, "b": 3}}' in second
