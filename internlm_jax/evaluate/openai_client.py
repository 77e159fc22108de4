"""An OpenAI-compatible endpoint as an EvalModel (our server, LMDeploy, vLLM, ...), over httpx.

Likelihood: POST /v1/completions with `echo: true, logprobs: 1, max_tokens: 0` (what lm-eval's
local-completions backend sends). With a local tokenizer the prompt goes as token ids, so the request is
exactly the one a local model scores (same BOS and boundary rules); without one it goes as text and the
continuation tokens are found from `text_offset` (a token that straddles the boundary counts as continuation,
the same rule as `split_context_continuation`).
Generation: chat-message prompts go to /v1/chat/completions, string prompts to /v1/completions (as ids
when a tokenizer is known).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from internlm_jax.config import ConfigError
from internlm_jax.evaluate.likelihood import ScoreResult, TokenRequest, move_trailing_space, truncate_left
from internlm_jax.evaluate.models import EvalModel, Prompt, cut_at_stop

_RETRY_STATUS = (429, 502, 503, 504)
_MAX_STOP = 4  # OpenAI accepts at most four stop strings; the rest are applied here


class EndpointError(RuntimeError):
    """The endpoint answered with an error or an unexpected body."""


class OpenAIModel(EvalModel):
    def __init__(self, base_url: str, model: str, *, name: str | None = None, api_key: str | None = None,
                 tokenizer: Any = None, batch_size: int = 8, max_length: int = 4096, timeout: float = 600.0,
                 scoring_max_tokens: int = 0, retries: int = 3, bos_id: int | None = None,
                 client: httpx.Client | None = None):
        if isinstance(tokenizer, (str, os.PathLike)):
            from internlm_jax.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(tokenizer)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name or model
        self.tokenizer = tokenizer
        self.bos_id = bos_id if bos_id is not None else (tokenizer.bos_id if tokenizer is not None else 1)
        self.batch_size = batch_size
        self.max_length = max_length
        self.scoring_max_tokens = scoring_max_tokens
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout, headers=headers)
        self.requests_sent = 0

    # ---- HTTP ------------------------------------------------------------------------------------------
    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{route}"
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post(url, json=body)
            except httpx.HTTPError as e:
                if attempt == self.retries:
                    raise EndpointError(f"POST {url} failed: {e}; is the server running?") from None
                time.sleep(0.5 * 2 ** attempt)
                continue
            self.requests_sent += 1
            if r.status_code in _RETRY_STATUS and attempt < self.retries:
                time.sleep(0.5 * 2 ** attempt)
                continue
            if r.status_code != 200:
                raise EndpointError(f"POST {url} -> HTTP {r.status_code}: {r.text[:500]}")
            try:
                return r.json()
            except ValueError:
                raise EndpointError(f"POST {url} returned non-JSON: {r.text[:200]}") from None
        raise AssertionError("unreachable")

    def _echo(self, prompts: list[Any]) -> list[dict[str, Any]]:
        body = {"model": self.model, "prompt": prompts, "echo": True, "logprobs": 1,
                "max_tokens": self.scoring_max_tokens, "temperature": 0.0}
        data = self._post("/completions", body)
        choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) or any(not c.get("logprobs") for c in choices):
            raise EndpointError("the endpoint did not return echoed prompt logprobs for every prompt; it must "
                                "support /v1/completions with echo=true, logprobs and max_tokens=0 "
                                "(try scoring_max_tokens=1 for servers that reject 0)")
        return [c["logprobs"] for c in choices]

    @staticmethod
    def _result(lp: dict[str, Any], start: int, end: int) -> ScoreResult:
        toks = lp["token_logprobs"][start:end]
        if any(t is None for t in toks):
            raise EndpointError("the endpoint returned no logprob for a continuation token")
        top = lp.get("top_logprobs") or [None] * end
        greedy = True
        for i in range(start, end):
            alts = top[i] if i < len(top) else None
            if alts:  # greedy: no alternative beats the actual token
                greedy = greedy and lp["token_logprobs"][i] >= max(alts.values()) - 1e-6
        return ScoreResult(float(np.sum(np.asarray(toks, np.float64))), greedy, end - start,
                           tuple(float(t) for t in toks))

    # ---- likelihood ----------------------------------------------------------------------------------
    def score_tokens(self, requests: Sequence[TokenRequest]) -> list[ScoreResult]:
        reqs = [truncate_left(list(c), list(x), self.max_length, self.bos_id) for c, x in requests]
        out: list[ScoreResult] = []
        for s in range(0, len(reqs), self.batch_size):
            chunk = reqs[s: s + self.batch_size]
            for (c, x), lp in zip(chunk, self._echo([c + x for c, x in chunk])):
                if len(lp["token_logprobs"]) < len(c) + len(x):
                    raise EndpointError(f"echo returned {len(lp['token_logprobs'])} token logprobs for a prompt of "
                                        f"{len(c) + len(x)} tokens")
                out.append(self._result(lp, len(c), len(c) + len(x)))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[Prompt, str]]) -> list[ScoreResult]:
        if self.tokenizer is not None:
            return super().loglikelihood(pairs)
        # Text mode: the server tokenises; find the continuation from character offsets.
        texts = [move_trailing_space(self.prompt_text(c), x) for c, x in pairs]
        out: list[ScoreResult] = []
        for s in range(0, len(texts), self.batch_size):
            chunk = texts[s: s + self.batch_size]
            for (c, x), lp in zip(chunk, self._echo([c + x for c, x in chunk])):
                offsets = lp.get("text_offset")
                if not offsets:
                    raise EndpointError("text-mode scoring needs text_offset in the logprobs; give the model a "
                                        "tokenizer instead")
                n = len(offsets) - max(self.scoring_max_tokens, 0)
                start = max(i for i in range(n) if offsets[i] <= len(c))
                out.append(self._result(lp, start, n))
        return out

    # ---- generation ----------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
        common: dict[str, Any] = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature,
                                  "top_p": top_p, "seed": seed}
        if top_k:
            common["top_k"] = top_k
        if stop:
            common["stop"] = list(stop)[:_MAX_STOP]
        out: list[str | None] = [None] * len(prompts)
        chats = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        for i in chats:
            data = self._post("/chat/completions", {**common, "messages": prompts[i]})
            out[i] = data["choices"][0]["message"].get("content") or ""
        for s in range(0, len(texts), self.batch_size):
            idx = texts[s: s + self.batch_size]
            batch = [self.prompt_ids(prompts[i]) if self.tokenizer is not None else prompts[i] for i in idx]
            data = self._post("/completions", {**common, "prompt": batch})
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            if len(choices) != len(idx):
                raise EndpointError(f"asked for {len(idx)} completions, got {len(choices)}")
            for i, c in zip(idx, choices):
                out[i] = c.get("text") or ""
        return [cut_at_stop(t or "", stop) for t in out]


def from_env_key(api_key_env: str | None) -> str | None:
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env)
    if key is None:
        raise ConfigError(f"environment variable {api_key_env} (api_key_env) is not set")
    return key
