"""The InternLM2 agent loop against a scripted model: multi-turn plugin calls, parallel calls, a tool error,
the code interpreter, a turn limit, and the exact transcript (messages, events and the rendered prompt)."""

from __future__ import annotations

import json

import pytest

from internlm_jax.agent import (
    Agent,
    AgentEvent,
    PromptBackend,
    PythonInterpreter,
    SandboxConfig,
    ScriptedBackend,
    ToolError,
    Toolkit,
    ToolResult,
    calculator_tool,
)
from internlm_jax.chat import DEFAULT_INTERPRETER_PROMPT

AS, AE, PLUGIN, INTERP = "<|action_start|>", "<|action_end|>", "<|plugin|>", "<|interpreter|>"


def get_weather(city: str) -> dict:
    """Current weather of a city.

    Args:
        city: City name.
    """
    if city != "Shanghai":
        raise ToolError(f"unknown city {city!r}")
    return {"city": city, "temperature": 22}


FUNCTIONS = [  # written out by hand: what the plugin system turn must declare
    {"name": "get_weather", "description": "Current weather of a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name."}},
                    "required": ["city"], "additionalProperties": False}},
    {"name": "calculator", "description": calculator_tool.description,
     "parameters": {"type": "object", "properties": {"expression": {
         "type": "string", "description": "An arithmetic expression, e.g. '(2 + 3) * sqrt(16) / 7'"}},
         "required": ["expression"], "additionalProperties": False}},
]

WEATHER_SCRIPT = [
    (f'I will check the weather first.{AS}{PLUGIN}\n{{"name": "get_weather", "parameters": {{"city": "Shanghai"}}}}'
     f'{AE}'),
    (f'{AS}{PLUGIN}\n{{"name": "get_weather", "parameters": {{"city": "Atlantis"}}}}{AE}'
     f'{AS}{PLUGIN}\n{{"name": "calculator", "arguments": {{"expression": "22 * 9 / 5 + 32"}}}}{AE}<|im_end|>'),
    "It is 22°C (71.6°F) in Shanghai; Atlantis is not a known city.<|im_end|>",
]


def call(i, name, args):
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def test_multi_turn_parallel_calls_and_a_tool_error_give_the_exact_transcript():
    backend = ScriptedBackend(WEATHER_SCRIPT)
    agent = Agent(backend, Toolkit([get_weather, calculator_tool]), system="You are a helpful assistant.")
    run = agent.chat("Weather in Shanghai and Atlantis, in Fahrenheit?")

    shanghai = {"city": "Shanghai", "temperature": 22}
    assert run.messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Shanghai and Atlantis, in Fahrenheit?"},
        {"role": "assistant", "content": "I will check the weather first.",
         "tool_calls": [call(0, "get_weather", {"city": "Shanghai"})]},
        {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": json.dumps(shanghai)},
        {"role": "assistant", "content": "", "tool_calls": [call(1, "get_weather", {"city": "Atlantis"}),
                                                            call(2, "calculator", {"expression": "22 * 9 / 5 + 32"})]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "Error: unknown city 'Atlantis'"},
        {"role": "tool", "tool_call_id": "call_2", "name": "calculator", "content": "71.6"},
        {"role": "assistant", "content": "It is 22°C (71.6°F) in Shanghai; Atlantis is not a known city."},
    ]
    assert run.events == [
        AgentEvent("thought", "I will check the weather first.", 1),
        AgentEvent("tool_call", 'get_weather({"city": "Shanghai"})', 1, "get_weather", {"city": "Shanghai"},
                   "call_0"),
        AgentEvent("tool_result", json.dumps(shanghai), 1, "get_weather", {"city": "Shanghai"}, "call_0",
                   ToolResult(ok=True, content=shanghai)),
        AgentEvent("tool_call", 'get_weather({"city": "Atlantis"})', 2, "get_weather", {"city": "Atlantis"},
                   "call_1"),
        AgentEvent("tool_result", "Error: unknown city 'Atlantis'", 2, "get_weather", {"city": "Atlantis"},
                   "call_1", ToolResult(ok=False, error="unknown city 'Atlantis'", error_type="tool_error")),
        AgentEvent("tool_call", 'calculator({"expression": "22 * 9 / 5 + 32"})', 2, "calculator",
                   {"expression": "22 * 9 / 5 + 32"}, "call_2"),
        AgentEvent("tool_result", "71.6", 2, "calculator", {"expression": "22 * 9 / 5 + 32"}, "call_2",
                   ToolResult(ok=True, content=71.6)),
        AgentEvent("answer", "It is 22°C (71.6°F) in Shanghai; Atlantis is not a known city.", 3),
    ]
    assert run.answer == "It is 22°C (71.6°F) in Shanghai; Atlantis is not a known city." and run.error is None

    # what the model saw on its last call, in the InternLM2 protocol
    assert [c["tools"] for c in backend.calls] == [[{"type": "function", "function": f} for f in FUNCTIONS]] * 3
    assert backend.calls[2]["prompt"] == (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>system name={PLUGIN}\n{json.dumps(FUNCTIONS, ensure_ascii=False)}<|im_end|>\n"
        "<|im_start|>user\nWeather in Shanghai and Atlantis, in Fahrenheit?<|im_end|>\n"
        f'<|im_start|>assistant\nI will check the weather first.{AS}{PLUGIN}\n'
        f'{{"name": "get_weather", "parameters": {{"city": "Shanghai"}}}}{AE}<|im_end|>\n'
        f'<|im_start|>environment name={PLUGIN}\n{{"city": "Shanghai", "temperature": 22}}<|im_end|>\n'
        f'<|im_start|>assistant\n{AS}{PLUGIN}\n{{"name": "get_weather", "parameters": {{"city": "Atlantis"}}}}{AE}'
        f'{AS}{PLUGIN}\n{{"name": "calculator", "parameters": {{"expression": "22 * 9 / 5 + 32"}}}}{AE}<|im_end|>\n'
        f"<|im_start|>environment name={PLUGIN}\nError: unknown city 'Atlantis'<|im_end|>\n"
        f"<|im_start|>environment name={PLUGIN}\n71.6<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_turn_limit_unknown_tool_and_bad_arguments():
    script = [f'{AS}{PLUGIN}\n{{"name": "web_search", "parameters": {{"q": "x"}}}}{AE}',
              f'Retrying.{AS}{PLUGIN}\n{{"name": "calculator", "parameters": {{"expr": "1"}}}}{AE}',
              "never used"]
    backend = ScriptedBackend(script)
    run = Agent(backend, [calculator_tool], max_turns=2).chat([{"role": "user", "content": "go"}])
    assert [(e.type, e.content) for e in run.events] == [
        ("tool_call", 'web_search({"q": "x"})'),
        ("tool_result", "Error: unknown tool 'web_search'; available: calculator"),
        ("thought", "Retrying."),
        ("tool_call", 'calculator({"expr": "1"})'),
        ("tool_result", ("Error: invalid arguments for 'calculator': arguments: missing required argument "
                         "'expression'; arguments: unexpected argument 'expr' (accepted: expression)")),
        ("error", "stopped after 2 model calls without a final answer (max_turns=2)"),
    ]
    assert run.answer is None and run.error == run.events[-1].content
    assert len(backend.calls) == 2 and run.messages[-1]["role"] == "tool"


def test_backend_failure_is_an_error_event():
    completion = f'{AS}{PLUGIN}\n{{"name": "calculator", "parameters": {{"expression": "1+1"}}}}{AE}'
    run = Agent(ScriptedBackend([completion]), [calculator_tool]).chat("hi")
    assert [e.type for e in run.events] == ["tool_call", "tool_result", "error"]
    assert run.error == ("the model backend failed: RuntimeError: ScriptedBackend ran out of completions: it has 1 "
                         "and this is call 2")


def test_interpreter_calls_run_in_the_sandbox():
    script = [f"Let me compute.{AS}{INTERP}\n```python\nimport math\nx = math.factorial(10)\nx\n```{AE}",
              f"{AS}{INTERP}\n```python\nprint(x // 2)\n1 / 0\n```{AE}",
              "10! is 3628800.<|im_end|>"]
    backend = ScriptedBackend(script)
    with PythonInterpreter(SandboxConfig(wall_seconds=10)) as interpreter:
        run = Agent(backend, interpreter=interpreter).chat("What is 10!?")
    results = [e.content for e in run.events if e.type == "tool_result"]
    assert results[0] == "3628800"
    assert results[1].startswith("1814400\nError: Traceback (most recent call last):\n")
    assert results[1].endswith("ZeroDivisionError: division by zero")
    assert [e.type for e in run.events] == ["thought", "tool_call", "tool_result", "tool_call", "tool_result",
                                            "answer"]
    assert run.events[1].content == "import math\nx = math.factorial(10)\nx"  # a UI shows the code
    assert all(c["interpreter"] and c["tools"] == [] for c in backend.calls)
    assert backend.calls[2]["prompt"] == (
        f"<s><|im_start|>system name={INTERP}\n{DEFAULT_INTERPRETER_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 10!?<|im_end|>\n"
        f"<|im_start|>assistant\nLet me compute.{AS}{INTERP}\n```python\nimport math\nx = math.factorial(10)\nx\n"
        f"```{AE}<|im_end|>\n<|im_start|>environment name={INTERP}\n3628800<|im_end|>\n"
        f"<|im_start|>assistant\n{AS}{INTERP}\n```python\nprint(x // 2)\n1 / 0\n```{AE}<|im_end|>\n"
        f"<|im_start|>environment name={INTERP}\n{results[1]}<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_backend_renders_and_stops_on_action_end():
    seen = []

    def generate(prompt: str, stop: list[str]) -> str:
        seen.append((prompt, stop))
        if len(seen) == 1:  # generation stopped on <|action_end|>, which the generator leaves out
            return f'{AS}{PLUGIN}\n{{"name": "calculator", "parameters": {{"expression": "6 * 7"}}}}'
        return "42"

    run = Agent(PromptBackend(generate), [calculator_tool]).chat("6 times 7?")
    assert run.answer == "42"
    assert [s for _, s in seen] == [["<|im_end|>", "<|action_end|>"]] * 2
    assert seen[1][0].endswith(f"<|im_start|>environment name={PLUGIN}\n42<|im_end|>\n<|im_start|>assistant\n")


def test_agent_validates_its_setup():
    with pytest.raises(ValueError, match="max_turns must be at least 1"):
        Agent(ScriptedBackend([]), max_turns=0)
    with pytest.raises(TypeError, match="interpreter must be a Tool"):
        Agent(ScriptedBackend([]), interpreter=object())

    def python(code: str) -> str:
        """Shadows the interpreter."""
        return code

    with pytest.raises(ValueError, match="would shadow the interpreter"):
        Agent(ScriptedBackend([]), [python], interpreter=calculator_tool)
