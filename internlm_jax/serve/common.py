"""Pieces shared by the chat and completions endpoints: context checks, sampling, collection, usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from internlm_jax.config import ConfigError
from internlm_jax.engine import SamplingParams, TokenEvent
from internlm_jax.serve.backend import Backend, Generation, watch_disconnect
from internlm_jax.serve.errors import APIError, bad_request
from internlm_jax.serve.schemas import _Sampling


class ClientGone(Exception):
    """The HTTP client disconnected before the reply was ready."""


def check_model(backend: Backend, name: str | None) -> str:
    served = backend.config.model_name
    if name is None or name == served:
        return served
    raise APIError(404, f"The model '{name}' does not exist; this server serves '{served}' (see GET /v1/models)",
                   param="model", code="model_not_found")


def resolve_max_tokens(backend: Backend, prompt_len: int, requested: int | None, what: str) -> int:
    """The output budget: `requested`, or what the context leaves; 400 if the prompt does not fit."""
    limit = backend.max_model_len
    if prompt_len + 1 > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, your {what} resulted "
                          f"in {prompt_len} tokens, which leaves no room for output. Please reduce the length of "
                          f"the {what}.", param="messages" if what == "messages" else "prompt",
                          code="context_length_exceeded")
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                          f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
                          f"completion). Please reduce the length of the {what} or max_tokens.",
                          param="max_tokens", code="context_length_exceeded")
    return requested


def check_token_ids(backend: Backend, ids: list[int], where: str) -> None:
    bad = [t for t in ids if not 0 <= t < backend.vocab_size]
    if bad:
        raise bad_request(f"{where} holds token id {bad[0]}, outside the vocabulary [0, {backend.vocab_size})",
                          param="prompt")


def sampling_params(req: _Sampling, *, max_tokens: int, stop_token_ids: tuple[int, ...], stop: tuple[str, ...],
                    logprobs: int | None, seed: int | None = None,
                    temperature: float | None = None, grammar: Any = None) -> SamplingParams:
    """The engine's SamplingParams from an OpenAI request (OpenAI defaults: temperature 1, top_p 1)."""
    temp = req.temperature if temperature is None else temperature
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if temp is None else float(temp),
            top_p=1.0 if req.top_p is None else float(req.top_p), top_k=max(0, req.top_k or 0),
            min_p=float(req.min_p or 0.0),
            repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
            presence_penalty=float(req.presence_penalty), frequency_penalty=float(req.frequency_penalty),
            seed=(req.seed if seed is None else seed), n=req.n,
            # ignore_eos (benchmarks): run to max_tokens, ignoring the end-of-turn tokens as well.
            stop_token_ids=() if req.ignore_eos else stop_token_ids, stop=stop, ignore_eos=req.ignore_eos,
            logprobs=logprobs, grammar=grammar)
    except ConfigError as e:
        raise bad_request(str(e)) from None


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(gen: Generation, receive: Any, on_batch: Callable[[list[tuple[int, TokenEvent]]], None]) -> None:
    """Drain a Generation for a non-streaming reply; raise ClientGone (and abort) if the client leaves."""
    batches = gen.batches().__aiter__()
    watcher = asyncio.ensure_future(watch_disconnect(receive))
    try:
        while True:
            nxt = asyncio.ensure_future(batches.__anext__())
            done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                gen.close(disconnect=True)
                raise ClientGone()
            try:
                batch = nxt.result()
            except StopAsyncIteration:
                return
            on_batch(batch)
    finally:
        watcher.cancel()
        gen.close()


def now() -> int:
    return int(time.time())


__all__ = ["ClientGone", "check_model", "check_token_ids", "collect", "now", "resolve_max_tokens",
           "sampling_params", "usage"]
