"""Baselines the engine is checked and benchmarked against.

`greedy_uncached`: greedy decoding by re-running the uncached `forward` over each growing sequence (no KV
cache at all, so it shares no code path with the paged cache). Sequences are right-padded to one length:
causal attention makes the padding invisible to the real tokens, and one compiled shape serves every step.

`DenseGenerator`: the classic one-request-at-a-time (or static batch) loop on the dense KV cache of
`model.forward`: left-padded prompts in power-of-two buckets, one prefill call, then one call per token.

`greedy_loop`: the same on one jitted program with the decode loop on the device (the floor for speed).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.model import forward, init_cache


@functools.lru_cache(maxsize=8)
def _uncached_logits(config: ModelConfig) -> Any:
    return jax.jit(lambda p, t: forward(p, t, config=config)[0])


def greedy_uncached(params: Any, config: ModelConfig, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int],
                    pad_to: int | None = None) -> list[list[int]]:
    """Greedy continuations (no eos stop) of every prompt, by uncached forward passes."""
    n = len(prompts)
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    total = max(len(p) + m for p, m in zip(prompts, limits))
    width = pad_to or total
    if width < total:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt + output ({total})")
    buf = np.zeros((n, width), np.int32)
    lens = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    fn = _uncached_logits(config)
    outs: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max(limits)):
        logits = np.asarray(fn(params, buf))
        nxt = logits[np.arange(n), lens - 1].argmax(-1)
        for i in range(n):
            if len(outs[i]) < limits[i]:
                outs[i].append(int(nxt[i]))
                buf[i, lens[i]] = nxt[i]
                lens[i] += 1
    return outs


def _bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


class DenseGenerator:
    """Greedy generation on the dense cache for a fixed batch size (1 = one request at a time)."""

    def __init__(self, params: Any, config: ModelConfig, batch: int, max_prompt: int, max_new: int):
        self.params, self.config, self.batch = params, config, batch
        self.max_len = _bucket(max_prompt) + max_new
        self.max_new = max_new
        self._prefill = jax.jit(functools.partial(self._prefill_fn, config), donate_argnums=(3,))
        self._decode = jax.jit(functools.partial(self._decode_fn, config), donate_argnums=(3,))

    @staticmethod
    def _prefill_fn(config, params, tokens, positions, cache):
        logits, cache = forward(params, tokens, positions, config=config, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    @staticmethod
    def _decode_fn(config, params, tokens, positions, cache):
        logits, cache = forward(params, tokens[:, None], positions[:, None], config=config, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    def warmup(self, prompt_lengths: Sequence[int]) -> None:
        for b in sorted({_bucket(n) for n in prompt_lengths}):
            self.generate([[1] * b] * self.batch, 2)

    def generate(self, prompts: Sequence[Sequence[int]], max_new: int, on_token: Any = None) -> list[list[int]]:
        """Left-pad to a bucket, prefill, then decode max_new tokens for every row (static batching)."""
        if len(prompts) > self.batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch}")
        B, P = self.batch, _bucket(max(len(p) for p in prompts))
        tokens = np.zeros((B, P), np.int32)
        positions = np.full((B, P), -1, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):] = p
            positions[i, P - len(p):] = np.arange(len(p))
        lens = np.array([len(p) for p in prompts] + [1] * (B - len(prompts)), np.int32)
        cache = init_cache(self.config, B, self.max_len)
        tok, cache = self._prefill(self.params, tokens, positions, cache)
        outs = [[] for _ in prompts]
        for step in range(max_new):
            host = np.asarray(tok)
            for i in range(len(prompts)):
                outs[i].append(int(host[i]))
            if on_token is not None:
                on_token(step)
            if step + 1 == max_new:
                break
            tok, cache = self._decode(self.params, tok, lens + step, cache)
        return outs


@functools.partial(jax.jit, static_argnames=("config", "max_new", "cache_len"))
def _greedy_loop(params, tokens, positions, *, config: ModelConfig, max_new: int, cache_len: int):
    B, P = tokens.shape
    cache = init_cache(config, B, cache_len)
    logits, cache = forward(params, tokens, positions, config=config, cache=cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first)

    def body(i, state):
        tok, cache, out = state
        pos = positions[:, -1] + i
        logits, cache = forward(params, tok[:, None], pos[:, None], config=config, cache=cache)
        tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return tok, cache, out.at[:, i].set(tok)

    _, _, out = jax.lax.fori_loop(1, max_new, body, (first, cache, out))
    return out


def greedy_loop(params: Any, config: ModelConfig, prompts: Sequence[Sequence[int]], max_new: int) -> np.ndarray:
    """The floor the engine is measured against: one jitted program (left-padded prefill on the dense cache,
    then a device-side loop of greedy decode steps, no host round trip per token), as a plain JAX decode
    loop is usually written. Greedy, no stop tokens; [B, max_new] token ids."""
    B, P = len(prompts), _bucket(max(len(p) for p in prompts))
    tokens = np.zeros((B, P), np.int32)
    positions = np.full((B, P), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        positions[i, P - len(p):] = np.arange(len(p))
    return np.asarray(_greedy_loop(params, tokens, positions, config=config, max_new=max_new, cache_len=P + max_new))
