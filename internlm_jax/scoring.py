"""Long-context scoring without [T, V] logits for every position: the sequence runs through the one forward in
chunks over a paged KV cache (its own pages, in order), the whole sequence rotated for its full length (as
the official code's single forward over it would), and each chunk's logits are reduced to the logprobs of
the next tokens (and the top-k) before the next chunk runs. Live memory: the chunk's [C, V] logits and
attention over key blocks (`kernels_pallas.paged_attention`'s blockwise reference on CPU), whatever T is.

    out = score_tokens(params, config, ids)     # out.token_logprobs[i] = log p(ids[i+1] | ids[:i+1])
    out.last_logits                             # [V] fp32 logits after the last token
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.kv_cache import PagedCache, init_paged_cache
from internlm_jax.model import forward, head

PAGE = 64


@dataclasses.dataclass
class TokenScores:
    token_logprobs: np.ndarray  # [T - 1] log p(token t | tokens < t), t = 1 .. T-1
    greedy: np.ndarray  # [T - 1] bool: token t was the argmax
    top_ids: np.ndarray | None  # [T - 1, k] the top-k next tokens at each position (k = top_k), or None
    top_logprobs: np.ndarray | None
    last_logits: np.ndarray  # [V] fp32 logits after the last token


@functools.partial(jax.jit, static_argnames=("config", "top_k"), donate_argnames=("cache",))
def _chunk(params: Any, tokens: Int[Array, "1 C"], positions: Int[Array, "1 C"], targets: Int[Array, "1 C"],
           cache: PagedCache, rope_len: Int[Array, "1"], *, config: ModelConfig, top_k: int):
    hidden, cache = forward(params, tokens, positions, config=config, cache=cache, rope_len=rope_len,
                            return_hidden=True)
    logits = head(params, hidden, config)[0]  # [C, V] fp32
    lp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(lp, targets[0][:, None], axis=-1)[:, 0]
    greedy = jnp.argmax(logits, axis=-1) == targets[0]
    last = jnp.maximum(jnp.sum(positions[0] >= 0) - 1, 0)
    top = jax.lax.top_k(lp, top_k) if top_k else (jnp.zeros((0,)), jnp.zeros((0,), jnp.int32))
    return tok, greedy, top[0], top[1], logits[last], cache


def score_tokens(params: Any, config: ModelConfig, ids: Sequence[int], *, chunk: int = 512, top_k: int = 0,
                 kv_dtype: str = "auto") -> TokenScores:
    """Per-token logprobs of `ids` (and the logits after the last token) in chunks of `chunk` tokens."""
    ids = [int(t) for t in ids]
    T = len(ids)
    if T == 0:
        raise ConfigError("nothing to score: give at least one token")
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    n_chunks = -(-T // chunk)
    need = -(-(n_chunks * chunk) // PAGE)
    pages = 1 << (need - 1).bit_length()  # a power of two: few compiled shapes
    cache = init_paged_cache(config, pages, PAGE, kv_dtype=kv_dtype, batch=1, max_pages_per_seq=pages)
    cache = cache.with_rows(jnp.arange(pages, dtype=jnp.int32)[None], jnp.zeros((1,), jnp.int32))
    rope_len = jnp.asarray([T], jnp.int32)
    padded = np.full((n_chunks * chunk + 1,), config.pad_token_id, np.int32)
    padded[:T] = ids
    outs = []
    for c in range(n_chunks):
        s = c * chunk
        n = min(chunk, T - s)
        positions = np.full((1, chunk), -1, np.int32)
        positions[0, :n] = np.arange(s, s + n)
        outs.append(_chunk(params, padded[None, s:s + chunk], positions, padded[None, s + 1:s + chunk + 1], cache,
                           rope_len, config=config, top_k=top_k))
        cache = outs[-1][-1]
    host = jax.device_get([o[:5] for o in outs])
    cat = lambda i: np.concatenate([h[i] for h in host])[: T - 1]  # noqa: E731
    return TokenScores(cat(0).astype(np.float64), cat(1), cat(3) if top_k else None, cat(2) if top_k else None,
                       np.asarray(host[-1][4]))


__all__ = ["TokenScores", "score_tokens"]
