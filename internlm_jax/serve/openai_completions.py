"""POST /v1/completions: raw prompts (text or token ids) -> engine -> text (or SSE), with echo and logprobs.

`echo` + `logprobs` + `max_tokens: 0` is the likelihood request of lm-eval's local-completions: the
prompt's own token logprobs come from one forward of the model (serve/scoring.py), the first token's is
null. Choice i * n + j is sample j of prompt i. Generation stops at EOS and <|im_end|> (unless
`ignore_eos`). logprobs and token_ids cover every generated token,
including a final stop token (whose text is not in `text`); `usage.completion_tokens` counts the same.
String prompts get BOS (once); token-id prompts are used exactly as given. Special-token names are removed
from the returned text unless `skip_special_tokens` is false.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from internlm_jax.config import ConfigError
from internlm_jax.engine import TokenEvent
from internlm_jax.serve.backend import Backend, Generation
from internlm_jax.serve.common import (
    check_model,
    check_token_ids,
    collect,
    now,
    resolve_max_tokens,
    sampling_params,
    usage,
)
from internlm_jax.serve.errors import APIError, bad_request
from internlm_jax.serve.schemas import (
    MAX_COMPLETION_LOGPROBS,
    CompletionRequest,
    check_max_tokens,
    check_sampling,
    completion_prompts,
    stop_strings,
)
from internlm_jax.serve.streaming import SSE_DONE, SSE_HEADERS, ChunkEncoder, TextFilter, TokenSurfaces, sse


class _Logprobs:
    """The completions logprobs object of one choice, built token by token."""

    def __init__(self, k: int, surfaces: TokenSurfaces, offset_of: Any):
        self.k, self.surfaces, self.offset_of = k, surfaces, offset_of
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None,
            first: bool = False) -> None:
        text = self.surfaces.text(token_id)
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        if first or top is None:
            self.top_logprobs.append(None)
        else:
            d = {self.surfaces.text(t): lp for t, lp in top[: self.k]}
            if logprob is not None:
                d.setdefault(text, logprob)  # OpenAI: the sampled token is always listed
            self.top_logprobs.append(d)
        self.text_offset.append(self.offset_of(token_id))

    def slice(self, start: int) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


class _Choice:
    def __init__(self, index: int, prompt: list[int], echo_text: str, backend: Backend, req: CompletionRequest,
                 special: list[str], surfaces: TokenSurfaces):
        self.index = index
        self.backend = backend
        self.text_parts: list[str] = [echo_text] if req.echo else []
        self.filter = TextFilter(special if req.skip_special_tokens else [])
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._offset = 0
        self._detok = None
        if req.logprobs is not None and backend.tokenizer is not None:
            from internlm_jax.tokenizer import IncrementalDetokenizer

            self._detok = IncrementalDetokenizer(backend.tokenizer, skip_special_tokens=req.skip_special_tokens)
        self.logprobs = _Logprobs(req.logprobs, surfaces, self._offset_of) if req.logprobs is not None else None
        self.sent_lp = 0

    def _offset_of(self, token_id: int) -> int:
        """Character offset where this token's text starts in the choice's text.

        A byte-fallback piece belongs to the character its byte ends up in: the last one it let out, or the
        held-back one that starts after them. Any other token starts after everything pushed before it,
        including the U+FFFD of an unfinished byte run that the token ends (flushed first, so it counts).
        """
        det = self._detok
        if det is None:
            return self._offset
        if not det.is_byte(token_id):
            self._offset += len(det.flush())
            at = self._offset
            self._offset += len(det.push(token_id))
            return at
        out = det.push(token_id)
        at = self._offset + len(out) - (1 if out and not det.held_bytes else 0)
        self._offset += len(out)
        return at

    def on_event(self, ev: TokenEvent) -> str:
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            if self.logprobs is not None:
                self.logprobs.add(ev.token_id, ev.logprob, ev.top_logprobs)
        text = self.filter.feed(ev.text)
        if ev.finished:
            text += self.filter.flush()
            self.finish_reason = ev.finish_reason
        self.text_parts.append(text)
        return text

    def reason(self) -> str:
        if self.finish_reason == "abort":
            raise self.backend.abort_error()
        return self.finish_reason or "length"


class CompletionPlan:
    def __init__(self, backend: Backend, req: CompletionRequest):
        self.model = check_model(backend, req.model)
        check_sampling(req)
        check_max_tokens(req.max_tokens, "max_tokens", 0)
        if req.suffix:
            raise bad_request("'suffix' (insertion) is not supported; leave it out", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(f"'best_of' other than n is not supported (got best_of={req.best_of}, n={req.n})",
                              param="best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise bad_request(f"'logprobs' must be in [0, {MAX_COMPLETION_LOGPROBS}], got {req.logprobs}",
                              param="logprobs")
        tok = backend.tokenizer
        self.prompts: list[list[int]] = []
        self.echo_texts: list[str] = []
        for i, p in enumerate(completion_prompts(req.prompt)):
            if isinstance(p, str):
                if tok is None:
                    raise bad_request("this server has no tokenizer: send prompts as token ids", param="prompt")
                if not p:
                    raise bad_request(f"prompt {i} is an empty string", param="prompt")
                ids = tok.encode(p, add_bos=True)
            else:
                ids = p
                check_token_ids(backend, ids, f"prompt {i}")
            self.prompts.append(ids)
            self.echo_texts.append(tok.decode(ids, skip_special_tokens=req.skip_special_tokens)
                                   if (req.echo and tok is not None) else "")
        requested = 16 if req.max_tokens is None else req.max_tokens
        if requested > 0:  # max_tokens 0 only scores the prompts: the engine is not used
            backend.check_fits(len(self.prompts), req.n)
        for i, p in enumerate(self.prompts):
            if requested > 0:
                resolve_max_tokens(backend, len(p), requested, "prompt")
            elif len(p) > backend.max_model_len:  # scoring only: the prompt itself must fit
                raise bad_request(f"This model's maximum context length is {backend.max_model_len} tokens. "
                                  f"However, prompt {i} has {len(p)} tokens. Please reduce its length.",
                                  param="prompt", code="context_length_exceeded")
        self.max_tokens = requested
        self.stop = stop_strings(req.stop)
        self.special = list(getattr(tok, "special_tokens", {}) or {}) if tok is not None else []
        # EOS, and <|im_end|> when the tokenizer has it (as LMDeploy, whose InternLM2 template stop words
        # apply to completions too): a chat model's turn ends there.
        self.stop_ids = tuple(tok.stop_token_ids(tools=False)) if tok is not None and \
            hasattr(tok, "stop_token_ids") else (backend.engine.config.eos_token_id,)
        self.req = req


async def completion(backend: Backend, req: CompletionRequest, request: Request):
    plan = await asyncio.to_thread(CompletionPlan, backend, req)  # tokenizing: off the event loop
    rid = backend.new_id("cmpl")
    created = now()
    prompt_lp = None
    if req.echo and req.logprobs is not None:
        try:
            prompt_lp = await asyncio.to_thread(backend.scorer.score, plan.prompts)
        except ConfigError as e:
            raise bad_request(str(e), param="prompt") from None
    surfaces = TokenSurfaces(backend.tokenizer)
    choices: list[_Choice] = []
    for pi, p in enumerate(plan.prompts):
        for j in range(req.n):
            ch = _Choice(pi * req.n + j, p, plan.echo_texts[pi], backend, req, plan.special, surfaces)
            if ch.logprobs is not None and prompt_lp is not None:
                lp = prompt_lp[pi]
                for t, (tid, v) in enumerate(zip(p, lp.token_logprobs)):
                    ch.logprobs.add(tid, v, lp.top[t], first=t == 0)
            choices.append(ch)
    gen = None
    if plan.max_tokens > 0:
        sp = sampling_params(req, max_tokens=plan.max_tokens, stop_token_ids=plan.stop_ids, stop=plan.stop,
                             logprobs=req.logprobs)
        gen = await backend.open(plan.prompts, sp)
    if req.stream:
        return StreamingResponse(_stream(backend, plan, gen, choices, rid, created), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    if gen is not None:
        def on_batch(batch: list[tuple[int, TokenEvent]]) -> None:
            for pi, ev in batch:
                choices[pi * req.n + ev.index].on_event(ev)

        await collect(gen, request.receive, on_batch)
    out = []
    for ch in choices:
        c: dict[str, Any] = {"index": ch.index, "text": "".join(ch.text_parts),
                             "logprobs": ch.logprobs.slice(0) if ch.logprobs is not None else None,
                             "finish_reason": ch.reason() if gen is not None else "length"}
        if req.return_token_ids:
            c["token_ids"] = ch.token_ids
        out.append(c)
    completion_tokens = gen.completion_tokens if gen is not None else 0
    cached = gen.cached_tokens // req.n if gen is not None else 0
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": plan.model,
                            "system_fingerprint": None, "choices": out,
                            "usage": usage(sum(len(p) for p in plan.prompts), completion_tokens, cached)}
    if req.return_token_ids:
        body["prompt_token_ids"] = plan.prompts if len(plan.prompts) > 1 else plan.prompts[0]
    return JSONResponse(body)


async def _stream(backend: Backend, plan: CompletionPlan, gen: Generation | None, choices: list[_Choice], rid: str,
                  created: int) -> AsyncIterator[bytes]:
    req = plan.req
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "text_completion", "created": created, "model": plan.model,
            "system_fingerprint": None}

    enc = ChunkEncoder(base, include_usage)

    def chunk(ch: _Choice, text: str, finish: str | None, ids: list[int] | None = None) -> bytes:
        lp = None
        if ch.logprobs is not None:
            lp = ch.logprobs.slice(ch.sent_lp)
            ch.sent_lp = len(ch.logprobs.tokens)
        c: dict[str, Any] = {"index": ch.index, "text": text, "logprobs": lp, "finish_reason": finish}
        if ids is not None:
            c["token_ids"] = ids
        return enc.choice(c)

    finished = False
    try:
        if req.echo:
            for ch in choices:
                yield chunk(ch, ch.text_parts[0], None if gen is not None else "length")
        elif gen is None:
            for ch in choices:
                yield chunk(ch, "", "length")
        if gen is not None:
            async for batch in gen.batches():
                by_choice: dict[int, list[TokenEvent]] = {}
                for pi, ev in batch:
                    by_choice.setdefault(pi * req.n + ev.index, []).append(ev)
                for index, events in by_choice.items():
                    ch = choices[index]
                    text = "".join(ch.on_event(ev) for ev in events)
                    ids = [ev.token_id for ev in events if ev.token_id is not None]
                    if text or ids:
                        yield chunk(ch, text, None, ids if req.return_token_ids else None)
                    if ch.finish_reason is not None:
                        try:
                            reason = ch.reason()
                        except APIError as e:
                            yield sse(e.body())
                            return
                        yield chunk(ch, "", reason)
        finished = True
        if include_usage:
            yield sse(dict(base, choices=[], usage=usage(
                sum(len(p) for p in plan.prompts), gen.completion_tokens if gen else 0,
                gen.cached_tokens // req.n if gen else 0)))
        yield SSE_DONE
    finally:
        if gen is not None:
            gen.close(disconnect=not finished)


__all__ = ["CompletionPlan", "completion"]
