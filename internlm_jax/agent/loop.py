"""The InternLM2 agent loop: call the model, run the tools it calls, feed results back, until it answers.

    agent = Agent(backend, Toolkit([get_weather, calculator_tool]), interpreter=PythonInterpreter())
    for event in agent.run("What is 2**100 and the weather in Shanghai?"):
        print(event.type, event.name or "", event.content)     # thought / tool_call / tool_result / answer

A backend (see `backends.py`) turns OpenAI-style messages + tool schemas into the model's raw completion in
the InternLM2 protocol (action blocks included); `internlm_jax.chat.parse_completion` reads the calls out. Tool
results go back as `tool` messages, which the chat template renders as `environment` turns
(`name=<|plugin|>`, or `name=<|interpreter|>` for code). The loop ends at the first reply without a call (the
answer) or after `max_turns` model calls (an `error` event says so).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

from internlm_jax import chat
from internlm_jax.agent.tools import Tool, Toolkit, ToolResult

EventType = Literal["thought", "tool_call", "tool_result", "answer", "error"]


class Backend(Protocol):
    """Anything that completes a conversation in the InternLM2 protocol."""

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                 interpreter: bool = False) -> str:
        """The model's raw reply to `messages` (OpenAI style), with `tools` (OpenAI tool objects) declared
        and the code interpreter enabled if `interpreter`."""
        ...


@dataclasses.dataclass(frozen=True)
class AgentEvent:
    """One step of a run, for UIs. `content` is the text to show (thought, answer, result text, error)."""

    type: EventType
    content: str = ""
    turn: int = 0                       # which model call (1-based) this event belongs to
    name: str | None = None             # tool name, for tool_call / tool_result
    arguments: Any = None               # parsed arguments, for tool_call
    call_id: str | None = None
    result: ToolResult | None = None    # for tool_result


@dataclasses.dataclass
class AgentRun:
    """What `Agent.chat` returns: the answer (None if the run ended in an error), the full transcript."""

    answer: str | None
    messages: list[dict[str, Any]]
    events: list[AgentEvent]
    error: str | None = None


class Agent:
    """The InternLM2 plugin + interpreter agent loop over any `Backend`.

    `interpreter` is a Tool taking {"code": str} (e.g. `PythonInterpreter().tool`) or an object with a
    `.tool`; with it the template declares `<|interpreter|>` and the model's code blocks run there.
    """

    def __init__(self, backend: Backend, tools: Toolkit | Iterable[Tool | Callable[..., Any]] | None = None, *,
                 interpreter: Tool | Any | None = None, system: str | None = None, max_turns: int = 8,
                 make_id: Callable[[], str] | None = None) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.backend = backend
        self.toolkit = tools if isinstance(tools, Toolkit) else Toolkit(tools or ())
        if interpreter is not None and not isinstance(interpreter, Tool):
            interpreter = getattr(interpreter, "tool", None)
            if not isinstance(interpreter, Tool):
                raise TypeError("interpreter must be a Tool taking {'code': str} or have a .tool attribute "
                                "(e.g. PythonInterpreter())")
        self.interpreter: Tool | None = interpreter
        if self.interpreter is not None and chat.INTERPRETER_TOOL_NAME in self.toolkit:
            raise ValueError(f"a plugin tool named {chat.INTERPRETER_TOOL_NAME!r} would shadow the interpreter; "
                             "rename it")
        self.system = system
        self.max_turns = max_turns
        self.make_id = make_id or _counter_ids()

    def run(self, messages: str | Sequence[dict[str, Any]],
            transcript: list[dict[str, Any]] | None = None) -> Iterator[AgentEvent]:
        """Run the loop, yielding events as they happen. `messages` is a user query or a whole OpenAI-style
        history; the conversation so far (including tool turns) is appended to `transcript` if given."""
        history = transcript if transcript is not None else []
        history.extend(self._start(messages))
        tools = self.toolkit.to_openai()
        for turn in range(1, self.max_turns + 1):
            try:
                text = self.backend.complete(copy.deepcopy(history), copy.deepcopy(tools),
                                             interpreter=self.interpreter is not None)
                content, calls = chat.parse_completion(text, make_id=self.make_id)
            except Exception as e:  # noqa: BLE001 - a UI gets an event, the transcript stays consistent
                yield AgentEvent("error", f"the model backend failed: {type(e).__name__}: {e}", turn)
                return
            if not calls:
                history.append({"role": "assistant", "content": content})
                yield AgentEvent("answer", content, turn)
                return
            history.append({"role": "assistant", "content": content, "tool_calls": calls})
            if content.strip():
                yield AgentEvent("thought", content, turn)
            for call in calls:
                name, raw = call["function"]["name"], call["function"]["arguments"]
                arguments = _loads(raw)
                yield AgentEvent("tool_call", _describe(name, arguments), turn, name, arguments, call["id"])
                result = self._execute(name, arguments)
                shown = result.to_text()
                history.append({"role": "tool", "tool_call_id": call["id"], "name": name, "content": shown})
                yield AgentEvent("tool_result", shown, turn, name, arguments, call["id"], result)
        yield AgentEvent("error", f"stopped after {self.max_turns} model calls without a final answer "
                         f"(max_turns={self.max_turns})", self.max_turns)

    def chat(self, messages: str | Sequence[dict[str, Any]]) -> AgentRun:
        """Run to the end; the answer, the transcript and the events."""
        transcript: list[dict[str, Any]] = []
        events = list(self.run(messages, transcript))
        last = events[-1]
        return AgentRun(last.content if last.type == "answer" else None, transcript, events,
                        last.content if last.type == "error" else None)

    def _start(self, messages: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        out = [dict(m) for m in messages]
        if self.system is not None and not (out and out[0].get("role") == "system"):
            out.insert(0, {"role": "system", "content": self.system})
        return out

    def _execute(self, name: str, arguments: Any) -> ToolResult:
        if name == chat.INTERPRETER_TOOL_NAME and self.interpreter is not None:
            return self.interpreter(arguments if isinstance(arguments, (dict, str)) else {"code": arguments})
        return self.toolkit.call(name, arguments)


def _loads(raw: Any) -> Any:
    """Tool-call arguments as parsed JSON; a string that is not JSON stays a string (the tool refuses it)."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _describe(name: str, arguments: Any) -> str:
    if name == chat.INTERPRETER_TOOL_NAME and isinstance(arguments, dict) and "code" in arguments:
        return str(arguments["code"])
    return f"{name}({json.dumps(arguments, ensure_ascii=False)})"


def _counter_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"
