"""OpenAI request schemas (pydantic, strict types) and their range checks.

Types are strict (`"max_tokens": "10"` or `true` is rejected, an int is fine for a float), unknown fields
are ignored (clients send `user`, `store`, `metadata`, ...). Fields that take several shapes (`stop`,
`prompt`, `tool_choice`, `response_format`) are checked by hand so their errors say what is allowed.
Every failure becomes a 400 whose message names the parameter, the value and the allowed range.

Extensions beyond OpenAI (as in vLLM / LMDeploy): `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`skip_special_tokens` (completions; default true) and `return_token_ids` (choices carry `token_ids`, the
response `prompt_token_ids`; streamed deltas carry the ids of their tokens).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from internlm_jax.serve.errors import APIError, bad_request

MAX_N = 64
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs; OpenAI allows 0..20
MAX_COMPLETION_LOGPROBS = 5  # completions: logprobs; OpenAI allows 0..5


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # str | None | [{"type": "text", "text": str}] (chat.render checks the parts)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # a forced call's arguments: unsupported schema keywords are a 400 (else ignored)


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: Any = None


class CompletionRequest(_Sampling):
    prompt: Any
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


# ---- parsing -------------------------------------------------------------------------------------------
def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict[str, Any]) -> str:
    where = _loc(err["loc"])
    value = err.get("input")
    kind = err.get("type", "")
    if kind == "missing":
        return f"'{where}' is required"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"'{where}': {err['msg']} (got {shown})"


def parse_request(cls: type[_Model], body: Any) -> Any:
    """A decoded JSON body -> a request model, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        msg = _describe(errs[0])
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        raise bad_request(msg, param=_loc(errs[0]["loc"]) or None) from None


def _range(name: str, value: float | None, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if value is None:
        return
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise bad_request(f"'{name}' must be in {left}{lo}, {hi}], got {value}", param=name)


def check_sampling(req: _Sampling) -> None:
    """Range checks shared by chat and completions."""
    _range("n", req.n, 1, MAX_N)
    _range("temperature", req.temperature, 0.0, 2.0)
    _range("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    _range("min_p", req.min_p, 0.0, 1.0)
    _range("presence_penalty", req.presence_penalty, -2.0, 2.0)
    _range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    _range("repetition_penalty", req.repetition_penalty, 0.0, 10.0, lo_open=True)
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"'top_k' must be -1 or 0 (off) or a positive number of tokens, got {req.top_k}",
                          param="top_k")
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise bad_request(f"'seed' must fit in 64 bits, got {req.seed}", param="seed")
    if req.logit_bias:
        raise bad_request("'logit_bias' is not supported by this server; leave it out", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")


def stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request(f"'stop' must be a string or a list of strings, got {stop!r:.60}", param="stop")
    if len(stop) > MAX_STOP:
        raise bad_request(f"'stop' takes at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    if any(not s for s in stop):
        raise bad_request("'stop' strings must be non-empty", param="stop")
    return tuple(stop)


def check_max_tokens(value: int | None, name: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise bad_request(f"'{name}' must be >= {minimum}, got {value}", param=name)


ToolChoice = tuple[str, str | None]  # ("none" | "auto" | "required" | "function", function name)


def tool_choice(req: ChatCompletionRequest) -> ToolChoice:
    """The tool_choice as (mode, function name); checks the named function is among the tools."""
    tc = req.tool_choice
    names = [t.function.name for t in req.tools or []]
    if tc is None:
        return ("auto" if names else "none", None)
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise bad_request(f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', "
                              f"'function': {{'name': ...}}}}, got {tc!r}", param="tool_choice")
        if tc != "none" and not names:
            raise bad_request(f"'tool_choice' is {tc!r} but no 'tools' were given", param="tool_choice")
        return (tc, None)
    if isinstance(tc, dict) and tc.get("type") == "function" and isinstance(tc.get("function"), dict) \
            and isinstance(tc["function"].get("name"), str):
        name = tc["function"]["name"]
        if name not in names:
            raise bad_request(f"'tool_choice' names function {name!r}, which is not among the tools {names}",
                              param="tool_choice")
        return ("function", name)
    raise bad_request(f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                      f"{{'name': ...}}}}, got {tc!r:.80}", param="tool_choice")


def response_format(req: ChatCompletionRequest) -> str:
    """'text', 'json_object' or 'json_schema' (then `json_schema.schema` is an object and `strict` a bool)."""
    rf = req.response_format
    if rf is None:
        return "text"
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad_request(f"'response_format' must be {{'type': 'text' | 'json_object' | 'json_schema'}}, "
                          f"got {rf!r:.80}", param="response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema' object",
                              param="response_format")
        if js.get("strict") is not None and not isinstance(js["strict"], bool):
            raise bad_request(f"'response_format.json_schema.strict' must be a boolean, got {js['strict']!r:.40}",
                              param="response_format")
    return kind


def check_tool_schemas(tools: list[Tool] | None) -> None:
    """400 naming the tool if a tool's `parameters` is not a valid JSON schema (its meta-schema's check)."""
    import jsonschema

    for i, tool in enumerate(tools or []):
        schema = tool.function.parameters
        if schema is None:
            continue
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            at = "".join(f"[{p!r}]" for p in e.absolute_path) or " (top level)"
            raise bad_request(f"tools[{i}] ({tool.function.name!r}): 'parameters' is not a valid JSON schema: "
                              f"{e.message} at parameters{at}; see https://json-schema.org",
                              param=f"tools[{i}].function.parameters", code="invalid_tool_schema") from None


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    err = ("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists, "
           f"got {prompt!r:.60}")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request(err if prompt != [] else "'prompt' is an empty list; give at least one prompt",
                          param="prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
           for p in prompt):
        if any(not p for p in prompt):
            raise bad_request("'prompt' contains an empty token list", param="prompt")
        return [list(p) for p in prompt]
    raise bad_request(err, param="prompt")


__all__ = [
    "MAX_COMPLETION_LOGPROBS",
    "MAX_N",
    "MAX_TOP_LOGPROBS",
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "check_max_tokens",
    "check_sampling",
    "check_tool_schemas",
    "completion_prompts",
    "parse_request",
    "response_format",
    "stop_strings",
    "tool_choice",
]
