"""Token-level likelihood: the context/continuation split, padded batches that cannot move a score, rolling
windows, and the jitted scorers that run the model's own `forward`.

Boundary rules (what `split_context_continuation` does, in order):
1. Trailing spaces and tabs of the context move to the front of the continuation (as lm-eval does), so
   ("Answer: ", "B") and ("Answer:", " B") are the same request. SentencePiece (InternLM2: no dummy prefix)
   glues a space to the following word ("▁B"), so the space belongs with the continuation. Newlines stay in
   the context (unlike lm-eval): a chat prompt ends with "<|im_start|>assistant\n", and that newline is
   part of the template, not of the answer.
2. The whole string context+continuation is tokenised once; the context alone is tokenised too. The
   continuation tokens are the suffix of the whole after the longest common prefix of the two. So the model
   always reads exactly the tokenisation of the full string, and if a token merges across the boundary it is
   counted (whole) in the continuation, never dropped or split.
3. BOS exactly once: the text is encoded without BOS and BOS is prepended unless the text already starts
   with it (a rendered chat prompt begins with "<s>").

Padding rules (why batch size cannot change a score): rows are right-padded; attention is causal by index,
so real tokens never see padding. Pad slots get position -1, so each row's dynamic-NTK rotation is that of
its own true length (the model computes the base per row). Shapes are bucketed (batch rows fixed, length a
power of two) to keep the number of compiled programs small.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from internlm_jax import model as model_lib
from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.layers import linear

TokenRequest = tuple[list[int], list[int]]  # (context ids incl. BOS, continuation ids)


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Log-likelihood of a continuation given its context."""

    logprob: float  # sum over continuation tokens of log p(token | everything before it)
    is_greedy: bool  # every continuation token was the model's argmax
    num_tokens: int
    token_logprobs: tuple[float, ...] = ()


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip(" \t")
    n = len(context) - len(stripped)
    return (stripped, context[len(stripped):] + continuation) if n else (context, continuation)


def with_bos(ids: Sequence[int], bos_id: int) -> list[int]:
    ids = list(ids)
    return ids if ids[:1] == [bos_id] else [bos_id] + ids


def split_context_continuation(encode: Callable[[str], list[int]], bos_id: int, context: str,
                               continuation: str) -> TokenRequest:
    """(context ids with BOS once, continuation ids); `encode` must not add BOS. See the module doc."""
    context, continuation = move_trailing_space(context, continuation)
    if not continuation:
        raise ConfigError(f"empty continuation after context {context[-40:]!r}: a likelihood request needs text "
                          "to score")
    whole = with_bos(encode(context + continuation), bos_id)
    ctx = with_bos(encode(context), bos_id) if context else [bos_id]
    p = 0
    limit = min(len(ctx), len(whole))
    while p < limit and ctx[p] == whole[p]:
        p += 1
    if p == len(whole):  # cannot happen for a non-empty continuation with a sane tokenizer
        raise ConfigError(f"continuation {continuation!r} adds no tokens after context {context[-40:]!r}")
    return whole[:p], whole[p:]


def rolling_windows(token_ids: Sequence[int], bos_id: int, window: int, stride: int | None = None
                    ) -> list[TokenRequest]:
    """Requests that score every token of a text exactly once, each model input at most `window` tokens.

    The first window reads [BOS] + tokens; later windows predict `stride` new tokens each, with the
    preceding `window - stride` tokens as context (stride = window: disjoint windows with one token of
    context, lm-eval's loglikelihood_rolling). Only the first window starts with BOS.
    """
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(f"rolling windows need window >= 2 and 1 <= stride <= window; got window={window}, "
                          f"stride={stride}")
    seq = [bos_id] + [int(t) for t in token_ids]  # predict seq[1:]
    n = len(seq)
    out: list[TokenRequest] = []
    a = 1
    while a < n:
        b = min(a + (window if a == 1 else stride), n)
        c = max(0, b - 1 - window)  # the model input is seq[c : b-1], at most `window` tokens
        out.append((seq[c:a], seq[a:b]))
        a = b
    return out


# ---- jitted scorers --------------------------------------------------------------------------------------
def _chunk(t: int) -> int:
    c = 1
    while c < 128 and t % (c * 2) == 0:
        c *= 2
    return c


@functools.partial(jax.jit, static_argnames=("config",))
def token_logprobs(params: Any, inputs: Int[Array, "B T"], positions: Int[Array, "B T"],
                   targets: Int[Array, "B T"], *, config: ModelConfig
                   ) -> tuple[Float[Array, "B T"], Bool[Array, "B T"]]:
    """log p(targets[b, t] | inputs[b, :t+1]) and whether it was the argmax, with the output head applied
    in length chunks so only [B, chunk, V] logits exist at once (V is 92544 for InternLM2)."""
    hidden, _ = model_lib.forward(params, inputs, positions, config=config, return_hidden=True)  # [B, T, D]
    B, T, D = hidden.shape
    c = _chunk(T)
    hc = hidden.reshape(B, T // c, c, D).swapaxes(0, 1)  # [T/c, B, c, D]
    tc = targets.reshape(B, T // c, c).swapaxes(0, 1)

    def one(args):
        h, t = args
        logits = linear(h, params["output"], "D", "V", jnp.dtype(config.dtype)).astype(jnp.float32)  # [B, c, V]
        # log_softmax at the target only: logit - logsumexp, both in fp32.
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return tgt - lse, jnp.argmax(logits, axis=-1) == t

    lp, greedy = jax.lax.map(one, (hc, tc))
    return lp.swapaxes(0, 1).reshape(B, T), greedy.swapaxes(0, 1).reshape(B, T)


@functools.partial(jax.jit, static_argnames=("config",))
def last_logprobs(params: Any, inputs: Int[Array, "B T"], positions: Int[Array, "B T"],
                  last: Int[Array, " B"], candidates: Int[Array, "B C"], *, config: ModelConfig
                  ) -> Float[Array, "B C"]:
    """log p(candidate | inputs[b, :last[b]+1]) for a few candidate next tokens per row (C: candidates)."""
    hidden, _ = model_lib.forward(params, inputs, positions, config=config, return_hidden=True)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    logits = linear(h, params["output"], "D", "V", jnp.dtype(config.dtype)).astype(jnp.float32)[:, 0]  # [B, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, candidates, axis=-1)


# ---- batching ---------------------------------------------------------------------------------------------
def bucket_length(n: int, limit: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return min(b, limit) if n <= limit else b


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


def truncate_left(ctx: list[int], cont: list[int], max_length: int, bos_id: int) -> tuple[list[int], list[int]]:
    """Keep the model input (ctx + cont minus the last token) within max_length by dropping the oldest
    context tokens; BOS stays in front. The continuation itself must fit."""
    if len(ctx) + len(cont) - 1 <= max_length:
        return ctx, cont
    if len(cont) + 1 > max_length:
        raise ConfigError(f"a continuation of {len(cont)} tokens does not fit the model's max_length "
                          f"{max_length}; raise max_length or use rolling windows")
    keep = max_length + 1 - len(cont) - 1  # context tokens kept after BOS
    return [bos_id] + ctx[len(ctx) - keep:], cont


class Scorer:
    """Batched likelihood through the jitted forward of one model (params + config, optional mesh)."""

    def __init__(self, params: Any, config: ModelConfig, *, batch_size: int = 8, max_length: int | None = None,
                 mesh: Any = None):
        from internlm_jax.api import context_limit

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.params, self.config, self.mesh = params, config, mesh
        self.batch_size = batch_size
        self.max_length = int(max_length or context_limit(config))
        self.forwards = 0  # number of batched forward calls (tests and progress)

    def _run(self, fn, *args, **kwargs):
        from internlm_jax.sharding import use_mesh

        with use_mesh(self.mesh):
            self.forwards += 1
            return fn(*args, **kwargs)

    def score(self, requests: Sequence[TokenRequest]) -> list[ScoreResult]:
        bos = self.config.bos_token_id
        reqs = [truncate_left(list(c), list(x), self.max_length, bos) for c, x in requests]
        for c, x in reqs:
            if not c or not x:
                raise ConfigError("a likelihood request needs a non-empty context (at least BOS) and continuation")
        seqs = [c + x for c, x in reqs]
        lengths = [len(s) - 1 for s in seqs]  # model input length
        results: list[ScoreResult | None] = [None] * len(reqs)
        for idx in plan_batches(lengths, self.batch_size):
            t = bucket_length(max(lengths[i] for i in idx), self.max_length)
            rows = self.batch_size
            inputs = np.full((rows, t), self.config.pad_token_id, np.int32)
            targets = np.zeros((rows, t), np.int32)
            positions = np.full((rows, t), -1, np.int32)  # pads at -1: see the module doc on dynamic NTK
            for r, i in enumerate(idx):
                s = seqs[i]
                inputs[r, : len(s) - 1] = s[:-1]
                targets[r, : len(s) - 1] = s[1:]
                positions[r, : len(s) - 1] = np.arange(len(s) - 1)
            lp, greedy = self._run(token_logprobs, self.params, inputs, positions, targets, config=self.config)
            lp, greedy = np.asarray(lp), np.asarray(greedy)
            for r, i in enumerate(idx):
                n_ctx, n_cont = len(reqs[i][0]), len(reqs[i][1])
                sl = slice(n_ctx - 1, n_ctx - 1 + n_cont)
                tok = lp[r, sl].astype(np.float64)
                results[i] = ScoreResult(float(tok.sum()), bool(greedy[r, sl].all()), n_cont,
                                         tuple(float(v) for v in tok))
        return results  # type: ignore[return-value]

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: Sequence[Sequence[int]]
                            ) -> list[np.ndarray]:
        """log p(each candidate token | context) per context (full-vocabulary softmax)."""
        bos = self.config.bos_token_id
        ctxs = [truncate_left(list(c), [0], self.max_length, bos)[0] for c in contexts]
        lengths = [len(c) for c in ctxs]
        n_cand = max(len(c) for c in candidates)
        width = max(8, 1 << (n_cand - 1).bit_length())
        out: list[np.ndarray | None] = [None] * len(ctxs)
        for idx in plan_batches(lengths, self.batch_size):
            t = bucket_length(max(lengths[i] for i in idx), self.max_length)
            rows = self.batch_size
            inputs = np.full((rows, t), self.config.pad_token_id, np.int32)
            positions = np.full((rows, t), -1, np.int32)
            last = np.zeros((rows,), np.int32)
            cand = np.zeros((rows, width), np.int32)
            for r, i in enumerate(idx):
                inputs[r, : lengths[i]] = ctxs[i]
                positions[r, : lengths[i]] = np.arange(lengths[i])
                last[r] = lengths[i] - 1
                cand[r, : len(candidates[i])] = candidates[i]
            lp = np.asarray(self._run(last_logprobs, self.params, inputs, positions, last, cand, config=self.config))
            for r, i in enumerate(idx):
                out[i] = lp[r, : len(candidates[i])].astype(np.float64)
        return out  # type: ignore[return-value]


def perplexity(logprob: float, num: int) -> float:
    return math.exp(-logprob / num) if num else float("nan")
