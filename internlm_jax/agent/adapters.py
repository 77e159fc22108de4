"""Our tools in other agent systems: LangChain tools, Lagent actions, and a Lagent LLM over our server.

    from internlm_jax.agent.adapters import to_langchain, to_lagent, lagent_llm

    lc_tools = [to_langchain(t) for t in Toolkit([calculator_tool, get_weather])]     # LangChain StructuredTools
    agent = langchain.agents.create_agent(ChatOpenAI(base_url="http://127.0.0.1:23333/v1", ...), lc_tools)

    from lagent.actions import ActionExecutor
    from lagent.agents import Internlm2Agent
    agent = Internlm2Agent(lagent_llm("http://127.0.0.1:23333/v1", "internlm2"),
                           plugin_executor=ActionExecutor([to_lagent(calculator_tool)]),
                           interpreter_executor=ActionExecutor([to_lagent_interpreter(PythonInterpreter().tool)]))

LangChain: the tool's JSON schema (from its type hints) is the LangChain `args_schema`; a run returns
`(text, result dict)` (content and artifact) and a failed run comes back to the model as an error ToolMessage
(`status="error"`), never as an exception in the agent. Lagent: an action whose description lists the same
parameters in Lagent's format; a failed call is an `ActionReturn` with `ARGS_ERROR` (bad arguments) or
`API_ERROR` and the message in `errmsg`, which Lagent's InternLM2 protocol shows to the model.
`lagent_llm` renders Lagent's messages with Lagent's own InternLM2 meta template and completes them on our
server's `/v1/completions` with special tokens kept, which is how Lagent drives InternLM2 through LMDeploy.

langchain-core (`pip install 'internlm-jax[agents]'`) and lagent (`pip install 'internlm-jax[lagent]'`) are
optional and imported on first use.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx

from internlm_jax import chat
from internlm_jax.agent.tools import Tool, ToolResult

# ---- LangChain --------------------------------------------------------------------------------------------


def to_langchain(tool: Tool) -> Any:
    """A LangChain `StructuredTool` that runs `tool` (sync and async)."""
    try:
        from langchain_core.tools import StructuredTool, ToolException
    except ImportError as e:
        raise ImportError("LangChain tools need langchain-core: pip install 'internlm-jax[agents]' "
                          "(or pip install 'langchain-core>=1.8,<2')") from e

    def outcome(result: ToolResult) -> tuple[str, dict[str, Any]]:
        if not result.ok:
            raise ToolException(result.to_text())
        return result.to_text(), result.to_dict()

    def run(**arguments: Any) -> tuple[str, dict[str, Any]]:
        return outcome(tool(arguments))

    async def arun(**arguments: Any) -> tuple[str, dict[str, Any]]:
        return outcome(await tool.acall(arguments))

    return StructuredTool(name=tool.name, description=tool.description or tool.name, args_schema=tool.parameters,
                          func=run, coroutine=arun, response_format="content_and_artifact",
                          handle_tool_error=_error_text, handle_validation_error=_error_text)


def _error_text(error: Exception) -> str:
    return str(error) if str(error).startswith("Error: ") or "\nError: " in str(error) else f"Error: {error}"


# ---- Lagent -----------------------------------------------------------------------------------------------

_LAGENT_TYPES = {"string": "STRING", "integer": "NUMBER", "number": "FLOAT", "boolean": "BOOLEAN",
                 "array": "Array", "object": "OBJECT"}


def _import_lagent() -> Any:
    try:
        import lagent.actions
        import lagent.llms
        import lagent.schema
    except ImportError as e:
        raise ImportError(f"Lagent actions need lagent 0.2.x, which could not be imported ({e}): pip install "
                          "'internlm-jax[lagent]' (or pip install 'lagent>=0.2.4,<0.3')") from e
    return lagent


def lagent_description(tool: Tool, name: str | None = None) -> dict[str, Any]:
    """A tool's description in Lagent's format: name, description, parameters [{name, type, description,
    ...}] and required (JSON-schema details such as enum, items and default kept on each parameter)."""
    props = tool.parameters.get("properties", {})
    params = []
    for pname, schema in props.items():
        kind = schema.get("type")
        kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
        entry = {"name": pname, "type": _LAGENT_TYPES.get(kind, "STRING"),
                 "description": schema.get("description", "")}
        entry.update({k: schema[k] for k in ("enum", "items", "default", "anyOf") if k in schema})
        params.append(entry)
    return {"name": name or tool.name, "description": tool.description, "parameters": params,
            "required": list(tool.parameters.get("required", []))}


def to_lagent(tool: Tool) -> Any:
    """A Lagent action (`lagent.actions.BaseAction`) that runs `tool`; put it in an `ActionExecutor`."""
    _import_lagent()
    return _lagent_action_class()(tool, lagent_description(tool))


def to_lagent_interpreter(tool: Tool, name: str = "IPythonInterpreter") -> Any:
    """An interpreter action for Lagent's `interpreter_executor`: Lagent's InternLM2 protocol sends the
    model's code as {"command": code}; ```python fences are removed and the code goes to `tool` as
    {"code": ...} (e.g. `PythonInterpreter().tool`, the sandboxed interpreter)."""
    _import_lagent()
    if "code" not in tool.parameters.get("properties", {}):
        raise ValueError(f"tool {tool.name!r} takes no 'code' argument; pass an interpreter tool such as "
                         "PythonInterpreter().tool")
    description = {"name": name, "description": tool.description,
                   "parameters": [{"name": "command", "type": "STRING", "description": "Python code"}],
                   "required": ["command"]}
    return _lagent_action_class()(tool, description, rename={"command": "code"}, strip_fences=True)


@functools.cache
def _lagent_action_class() -> type:
    from lagent.actions import BaseAction
    from lagent.schema import ActionReturn, ActionStatusCode

    class InternLMJaxAction(BaseAction):
        """One internlm-jax Tool as a Lagent action (the description is given per instance)."""

        __tool_name__ = "InternLMJaxAction"

        def __init__(self, tool: Tool, description: dict[str, Any], rename: dict[str, str] | None = None,
                     strip_fences: bool = False) -> None:
            super().__init__(description=description)
            self.tool, self.rename, self.strip_fences = tool, dict(rename or {}), strip_fences

        def run(self, **kwargs: Any) -> Any:
            arguments = {self.rename.get(k, k): v for k, v in kwargs.items()}
            if self.strip_fences and isinstance(arguments.get("code"), str):
                arguments["code"] = chat._strip_fences(arguments["code"].strip())
            result = self.tool(arguments)
            if result.ok:
                return ActionReturn(args=kwargs, type=self.name, result=[{"type": "text", "content":
                                                                         result.to_text()}])
            state = ActionStatusCode.ARGS_ERROR if result.error_type == "invalid_arguments" else \
                ActionStatusCode.API_ERROR
            return ActionReturn(args=kwargs, type=self.name, errmsg=result.to_text(), state=state)

    return InternLMJaxAction


def lagent_llm(base_url: str, model: str | None = None, *, api_key: str | None = None, timeout: float = 300.0,
               max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               repetition_penalty: float = 1.0, stop_words: list[str] | None = None) -> Any:
    """A Lagent LLM (`lagent.llms.BaseModel`) on an OpenAI-compatible server that takes raw prompts on
    `/v1/completions` with `skip_special_tokens: false` (ours; LMDeploy's and vLLM's too). Lagent's own
    InternLM2 meta template renders the messages; generation stops on <|im_end|> and <|action_end|>.
    `model` defaults to the server's first model."""
    _import_lagent()
    from lagent.llms import INTERNLM2_META

    url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        response = httpx.get(f"{url}/models", headers=headers, timeout=timeout)
        response.raise_for_status()
        model = response.json()["data"][0]["id"]
    return _lagent_llm_class()(url, model, headers, timeout, meta_template=INTERNLM2_META,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               repetition_penalty=repetition_penalty,
                               stop_words=stop_words if stop_words is not None else list(chat.TOOL_STOP_WORDS))


@functools.cache
def _lagent_llm_class() -> type:
    from lagent.llms import BaseModel

    class InternLMJaxLagentLLM(BaseModel):
        """Lagent's model interface over `/v1/completions` (see `lagent_llm`)."""

        def __init__(self, url: str, model: str, headers: dict[str, str], timeout: float, **kwargs: Any) -> None:
            super().__init__(path=url, **kwargs)
            self.url, self.model, self.headers, self.timeout = url, model, headers, timeout

        def generate(self, inputs: str | list[str], **gen_params: Any) -> str | list[str]:
            params = self.update_gen_params(**gen_params)
            prompts = [inputs] if isinstance(inputs, str) else list(inputs)
            body: dict[str, Any] = {
                "model": self.model, "prompt": prompts, "max_tokens": params["max_new_tokens"],
                "temperature": params["temperature"], "top_p": params["top_p"],
                "stop": params["stop_words"] or None, "skip_special_tokens": False}
            if params.get("top_k"):
                body["top_k"] = int(params["top_k"])
            if params.get("repetition_penalty", 1.0) != 1.0:
                body["repetition_penalty"] = params["repetition_penalty"]
            response = httpx.post(f"{self.url}/completions", json=body, headers=self.headers, timeout=self.timeout)
            if response.status_code != 200:
                raise RuntimeError(f"{self.url}/completions answered HTTP {response.status_code}: "
                                   f"{response.text[:500]}")
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            texts = [c["text"] for c in choices]
            return texts[0] if isinstance(inputs, str) else texts

    return InternLMJaxLagentLLM


__all__ = ["lagent_description", "lagent_llm", "to_lagent", "to_lagent_interpreter", "to_langchain"]
