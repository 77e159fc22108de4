"""Backends for the agent loop: each turns messages + tool schemas into the model's raw InternLM2 reply.

- `ScriptedBackend`: replays fixed completions (tests, demos).
- `PromptBackend`: renders the prompt itself and calls any text generator (a local model, `/v1/completions`
  with special tokens kept).
- `OpenAIChatBackend`: any OpenAI-compatible `/v1/chat/completions` endpoint (ours or another) with the
  tools in the `tools` field; the structured reply is written back as InternLM2 action blocks so that the
  loop parses every backend's output the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from internlm_jax import chat


class ScriptedBackend:
    """Replays fixed completions, one per call, and records what each call was given."""

    def __init__(self, completions: Sequence[str]) -> None:
        self.completions = list(completions)
        self.calls: list[dict[str, Any]] = []

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                 interpreter: bool = False) -> str:
        if len(self.calls) >= len(self.completions):
            raise RuntimeError(f"ScriptedBackend ran out of completions: it has {len(self.completions)} and "
                               f"this is call {len(self.calls) + 1}")
        self.calls.append({"messages": messages, "tools": tools, "interpreter": interpreter,
                           "prompt": chat.render(messages, tools=tools or None, interpreter=interpreter)})
        return self.completions[len(self.calls) - 1]


class PromptBackend:
    """Renders the InternLM2 prompt and hands it to `generate(prompt, stop) -> str`, which must return the
    raw completion with special tokens kept as text (a local model decoded without skipping special tokens,
    or `/v1/completions` with `skip_special_tokens: false`). Generation stopped on `<|action_end|>` may leave
    that marker out; the parser accepts the open block."""

    def __init__(self, generate: Callable[[str, list[str]], str]) -> None:
        self.generate = generate

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                 interpreter: bool = False) -> str:
        prompt = chat.render(messages, tools=tools or None, interpreter=interpreter)
        return self.generate(prompt, chat.stop_words(tools=bool(tools) or interpreter))


INTERPRETER_FUNCTION = {
    "type": "function",
    "function": {"name": chat.INTERPRETER_TOOL_NAME, "description": chat.DEFAULT_INTERPRETER_PROMPT,
                 "parameters": {"type": "object", "properties": {"code": {"type": "string",
                                                                          "description": "Python code"}},
                                "required": ["code"]}},
}


class OpenAIChatBackend:
    """An OpenAI-compatible chat endpoint: `OpenAIChatBackend("http://127.0.0.1:8000/v1", "internlm2")`.

    The Chat Completions API has no code-interpreter switch, so with the interpreter on, a function named
    "python" taking {"code": str} joins the tools; its calls run in the interpreter all the same."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 300.0,
                 **params: Any) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.params = params  # temperature, max_tokens, ... passed through
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                 interpreter: bool = False) -> str:
        tools = list(tools) + ([INTERPRETER_FUNCTION] if interpreter else [])
        body: dict[str, Any] = {"model": self.model, "messages": messages, **self.params}
        if tools:
            body["tools"] = tools
        response = httpx.post(self.url, json=body, headers=self.headers, timeout=self.timeout)
        if response.status_code != 200:
            raise RuntimeError(f"{self.url} answered HTTP {response.status_code}: {response.text[:500]}")
        try:
            message = response.json()["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"{self.url} did not return a chat completion: {response.text[:500]}") from e
        return as_protocol_text(message.get("content"), message.get("tool_calls") or [])


def as_protocol_text(content: str | None, tool_calls: list[dict[str, Any]]) -> str:
    """An assistant message (content + OpenAI tool_calls) as the InternLM2 reply text it stands for."""
    text = content or ""
    for call in tool_calls:
        fn = call.get("function", {})
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # passed on as a string; the tool reports invalid arguments
        body = json.dumps({"name": fn.get("name", ""), "parameters": arguments}, ensure_ascii=False)
        text += f"{chat.ACTION_START}{chat.PLUGIN}\n{body}{chat.ACTION_END}"
    return text
