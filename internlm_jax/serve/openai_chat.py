"""POST /v1/chat/completions: messages -> InternLM2 template -> engine -> content / tool_calls (or SSE).

Messages become ids with chat.encode_chat: their text (and the tools') is never parsed for special tokens,
so a user cannot forge a turn, unless ServeConfig.allow_special_tokens_in_content trusts the clients.

Tools: `tools` render as InternLM2's plugin system turn (chat.render); each `parameters` must be a valid JSON
schema (checked with jsonschema, else 400 naming the tool); with tools on, the reply is parsed
with chat.StreamingParser, so text that belongs to an action block never reaches `content`, and a completed
block becomes a `tool_calls` entry (streamed as one delta per call, when its block closes). With tools the
reply also stops at <|action_end|>. Any remaining special-token names are removed from `content`.

`tool_choice`: "none" leaves the tools out of the prompt; "auto" lets the model decide; "required" and a
named function force a call by constrained decoding (internlm_jax.grammar): the reply must be one
`<|action_start|><|plugin|>\\n{"name": N, "parameters": P}<|action_end|>` block, N one of the tools ("required")
or the named one, P valid for N's `parameters` schema, the action tokens being the real special tokens. It
parses into `tool_calls`; nothing is injected into the prompt or the content.

`response_format` json_object / json_schema: the reply is constrained to a JSON object / an instance of the
schema, token by token (masks inside the sampler, streaming included), so a finished reply always parses
(and validates); only a reply cut by max_tokens (finish_reason "length") can be incomplete. One generation,
at the request's own temperature (0 stays greedy). json_schema `strict: true` makes unsupported schema
keywords a 400 (otherwise they are ignored). A schema that cannot be compiled is a 400 with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from internlm_jax import chat as chat_lib
from internlm_jax.engine import TokenEvent
from internlm_jax.grammar import GrammarError, GrammarSpec
from internlm_jax.serve.backend import Backend, Generation
from internlm_jax.serve.common import check_model, collect, now, resolve_max_tokens, sampling_params, usage
from internlm_jax.serve.errors import APIError, bad_request
from internlm_jax.serve.schemas import (
    MAX_TOP_LOGPROBS,
    ChatCompletionRequest,
    check_max_tokens,
    check_sampling,
    check_tool_schemas,
    response_format,
    stop_strings,
    tool_choice,
)
from internlm_jax.serve.streaming import SSE_DONE, SSE_HEADERS, ChunkEncoder, TextFilter, TokenSurfaces, sse


class ChatPlan:
    """Everything decided before generation: prompt ids, forced prefix, sampling, output options."""

    def __init__(self, backend: Backend, req: ChatCompletionRequest):
        self.backend = backend
        tok = backend.tokenizer
        if tok is None:
            raise bad_request("this server was started without a tokenizer, so it cannot render chat messages; "
                              "restart it with --tokenizer DIR, or send token ids to /v1/completions")
        self.model = check_model(backend, req.model)
        check_sampling(req)
        check_max_tokens(req.max_tokens, "max_tokens", 1)
        check_max_tokens(req.max_completion_tokens, "max_completion_tokens", 1)
        if not req.messages:
            raise bad_request("'messages' is empty; send at least one message, e.g. "
                              "[{'role': 'user', 'content': 'Hello'}]", param="messages")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_request(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}",
                                  param="top_logprobs")
        check_tool_schemas(req.tools)
        mode, fname = tool_choice(req)
        self.json_mode = response_format(req)
        self.grammar = self._grammar(backend, req, mode, fname)
        backend.check_fits(1, req.n)
        tools = [t.function.model_dump(exclude_none=True, exclude={"strict"}) for t in req.tools] \
            if req.tools and mode != "none" else None
        messages = []
        for m in req.messages:
            d = m.model_dump(exclude_none=True)
            if d["role"] == "developer":  # OpenAI's newer name for the system role
                d["role"] = "system"
            messages.append(d)
        try:
            # Message text stays text: a "<|im_start|>" typed by a user is not a control token (unless the
            # operator trusts its clients with --allow-special-tokens-in-content).
            ids = chat_lib.encode_chat(tok, messages, tools=tools, add_generation_prompt=True,
                                       trusted=backend.config.allow_special_tokens_in_content)
        except chat_lib.TemplateError as e:
            raise bad_request(str(e), param="messages") from None
        self.prompt_ids = ids
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self.max_tokens = resolve_max_tokens(backend, len(ids), requested, "messages")
        self.tools = bool(tools)
        self.stop_ids = tuple(tok.stop_token_ids(tools=self.tools))
        self.stop = stop_strings(req.stop)
        self.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self.req = req
        self.special = list(getattr(tok, "special_tokens", {}) or {}) + list(chat_lib.CHAT_SPECIAL_TOKENS)

    @staticmethod
    def _grammar(backend: Backend, req: ChatCompletionRequest, mode: str, fname: str | None) -> GrammarSpec | None:
        """The output grammar: a forced tool call, else the response_format's JSON; compiled here (cached) so
        an unusable schema is a 400 before anything is queued."""
        param = "response_format"
        try:
            if mode in ("required", "function"):
                fns = [t.function for t in req.tools or [] if mode == "required" or t.function.name == fname]
                param = "tools"
                spec = GrammarSpec.tool_call([(f.name, f.parameters) for f in fns],
                                             strict=any(bool(f.strict) for f in fns))
            elif response_format(req) == "json_object":
                spec = GrammarSpec.json_object()
            elif response_format(req) == "json_schema":
                js = req.response_format["json_schema"]
                schema = js.get("schema", {})
                import jsonschema

                try:
                    jsonschema.validators.validator_for(schema).check_schema(schema)
                except jsonschema.SchemaError as e:
                    raise GrammarError(f"not a valid JSON schema: {e.message}") from None
                spec = GrammarSpec.json_schema(schema, strict=bool(js.get("strict")))
            else:
                return None
            backend.engine.grammar_compiler.check(spec)
        except GrammarError as e:
            what = "the tools' parameters" if param == "tools" else "'response_format.json_schema'"
            raise bad_request(f"{what} cannot be used for constrained decoding: {e}", param=param,
                              code="invalid_schema") from None
        return spec

    def sampling(self):
        return sampling_params(self.req, max_tokens=self.max_tokens, stop_token_ids=self.stop_ids, stop=self.stop,
                               logprobs=self.logprobs, grammar=self.grammar)


class _Choice:
    """One choice's text pipeline: StreamingParser (tool calls) -> TextFilter (special names) -> content."""

    def __init__(self, index: int, plan: ChatPlan, surfaces: TokenSurfaces):
        self.index = index
        self.backend = plan.backend
        # Tool calls are parsed only when tools are on (as LMDeploy does); otherwise text is text.
        self.parser = chat_lib.StreamingParser() if plan.tools else None
        self.filter = TextFilter(plan.special)
        self.surfaces = surfaces
        self.content: list[str] = []
        self.tool_calls: list[dict] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict] | None = [] if plan.logprobs is not None else None
        self.finish_reason: str | None = None

    def _delta(self, text: str, final: bool) -> tuple[str, list[dict]]:
        content, calls = text, []
        if self.parser is not None:
            out = self.parser.feed(text)
            content, calls = out.content, list(out.tool_calls)
            if final:
                end = self.parser.finish()
                content += end.content
                calls += end.tool_calls
        content = self.filter.feed(content) + (self.filter.flush() if final else "")
        self.content.append(content)
        self.tool_calls += calls
        return content, calls

    def on_event(self, ev: TokenEvent) -> tuple[str, list[dict], list[dict]]:
        """(content delta, new tool calls, new logprob entries) for one engine event."""
        new_lp: list[dict] = []
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            if self.logprobs is not None:
                new_lp.append(self._logprob_entry(ev))
                self.logprobs.append(new_lp[-1])
        text = ev.text
        if ev.finished:
            self.finish_reason = ev.finish_reason
        content, calls = self._delta(text, ev.finished)
        return content, calls, new_lp

    def _logprob_entry(self, ev: TokenEvent) -> dict:
        text, raw = self.surfaces(ev.token_id)
        tops = []
        for tid, lp in ev.top_logprobs or []:
            t, b = self.surfaces(tid)
            tops.append({"token": t, "logprob": lp, "bytes": b})
        return {"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": tops}

    @property
    def text(self) -> str:
        return "".join(self.content)

    def final_reason(self) -> str:
        if self.finish_reason == "abort":
            raise self.backend.abort_error()
        if self.tool_calls and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason or "stop"


def _message(ch: _Choice) -> dict[str, Any]:
    text = ch.text
    msg: dict[str, Any] = {"role": "assistant", "content": text if (text or not ch.tool_calls) else None}
    if ch.tool_calls:
        msg["tool_calls"] = ch.tool_calls
    return msg


async def _run_once(backend: Backend, plan: ChatPlan, request: Request) -> tuple[list[_Choice], Generation]:
    gen = await backend.open([plan.prompt_ids], plan.sampling())
    surfaces = TokenSurfaces(backend.tokenizer)
    choices = [_Choice(i, plan, surfaces) for i in range(plan.req.n)]

    def on_batch(batch: list[tuple[int, TokenEvent]]) -> None:
        for _, ev in batch:
            choices[ev.index].on_event(ev)

    await collect(gen, request.receive, on_batch)
    return choices, gen


async def chat_completion(backend: Backend, req: ChatCompletionRequest, request: Request):
    plan = await asyncio.to_thread(ChatPlan, backend, req)  # template + tokenizer: off the event loop
    rid = backend.new_id("chatcmpl")
    created = now()
    if req.stream:
        gen = await backend.open([plan.prompt_ids], plan.sampling())
        return StreamingResponse(_stream(backend, plan, gen, rid, created), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    choices, gen = await _run_once(backend, plan, request)
    completion_tokens = gen.completion_tokens
    out_choices = []
    for ch in choices:
        c: dict[str, Any] = {"index": ch.index, "message": _message(ch),
                             "logprobs": {"content": ch.logprobs} if ch.logprobs is not None else None,
                             "finish_reason": ch.final_reason()}
        if req.return_token_ids:
            c["token_ids"] = ch.token_ids
        out_choices.append(c)
    body: dict[str, Any] = {"id": rid, "object": "chat.completion", "created": created, "model": plan.model,
                            "system_fingerprint": None, "choices": out_choices,
                            "usage": usage(len(plan.prompt_ids), completion_tokens, gen.cached_tokens // req.n)}
    if req.return_token_ids:
        body["prompt_token_ids"] = plan.prompt_ids
    return JSONResponse(body)


async def _stream(backend: Backend, plan: ChatPlan, gen: Generation, rid: str, created: int
                  ) -> AsyncIterator[bytes]:
    req = plan.req
    surfaces = TokenSurfaces(backend.tokenizer)
    choices = [_Choice(i, plan, surfaces) for i in range(req.n)]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": plan.model,
            "system_fingerprint": None}

    enc = ChunkEncoder(base, include_usage)

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> bytes:
        return enc.choice({"index": index, "delta": delta,
                           "logprobs": {"content": logprobs} if logprobs is not None else None,
                           "finish_reason": finish})

    finished = False
    try:
        for ch in choices:
            yield chunk(ch.index, {"role": "assistant", "content": ""})
        async for batch in gen.batches():
            by_choice: dict[int, list[TokenEvent]] = {}
            for _, ev in batch:
                by_choice.setdefault(ev.index, []).append(ev)
            for index, events in by_choice.items():
                ch = choices[index]
                text, calls, lps, ids = "", [], [], []
                for ev in events:
                    t, c, lp = ch.on_event(ev)
                    text += t
                    calls += c
                    lps += lp
                    if ev.token_id is not None:
                        ids.append(ev.token_id)
                delta: dict[str, Any] = {}
                if text:
                    delta["content"] = text
                if calls:
                    start = len(ch.tool_calls) - len(calls)
                    delta["tool_calls"] = [dict(call, index=start + k) for k, call in enumerate(calls)]
                if req.return_token_ids and ids:
                    delta["token_ids"] = ids
                if delta or lps:
                    yield chunk(index, delta, None, lps if ch.logprobs is not None else None)
                if ch.finish_reason is not None:
                    try:
                        reason = ch.final_reason()
                    except APIError as e:
                        yield sse(e.body())
                        return
                    yield chunk(index, {}, reason)
        finished = True
        if include_usage:
            yield sse(dict(base, choices=[], usage=usage(len(plan.prompt_ids), gen.completion_tokens,
                                                         gen.cached_tokens // req.n)))
        yield SSE_DONE
    finally:
        gen.close(disconnect=not finished)


__all__ = ["ChatPlan", "chat_completion"]
