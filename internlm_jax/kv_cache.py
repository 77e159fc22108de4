"""The KV caches `model.forward` writes and attends through: none, dense, or paged.

The layer code is the same for all three; per layer it calls `attend(cache, step, layer, q, k, v, ...)`,
which writes this call's keys/values and returns the attention output. `begin` prepares the per-call
bookkeeping (`step`: write slots and key positions, shared by every layer) and `end` advances the cache.

Dense cache (a dict, from `init_dense_cache`): k/v [L, B, S, K, H]; `pos` [B, S] holds each slot's
position (-1 = empty); `index` is the next slot to write (shared by the batch: prompts are left-padded).

Paged cache (`PagedCache`): a pool of fixed-size pages per layer, k/v [L, P, S, K, H] (here S is the page
size), shared by every sequence; a row owns a list of pages (a row of `page_table` [B, W]) and its token at
position `p` lives in page `page_table[b, p // S]`, slot `p % S`. With `kv_dtype="int8"` the pool holds
int8 values with one fp32 scale per token per kv head (`k_scale`/`v_scale` [L, P, S, K]): symmetric,
scale = max|x| / 127 over the head dim, quantized once when written and dequantized when read, so a token
sees the same (quantized) K/V of itself in the step that writes it as in every later step.

Both caches ride in the layer scan's carry, so each layer's write updates the buffer in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from internlm_jax import attention
from internlm_jax.config import ConfigError, ModelConfig

KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
INT8_MAX = 127.0

DenseCache = dict[str, jax.Array]


# ---- dense ------------------------------------------------------------------------------------------
def init_dense_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> DenseCache:
    """A dense KV cache: k/v [L, B, S, K, H], `pos` [B, S] (-1 = empty) and the next slot `index`."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((batch, max_len), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


# ---- paged ------------------------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "k_scale", "v_scale", "page_table",
                                                                   "lengths"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """A page pool plus the page tables of the rows of one forward call.

    k, v:        [L, P, S, K, H] pages (S = page size); int8 when quantized.
    k_scale, v_scale: [L, P, S, K] fp32 per-token-per-head scales, or None for a float pool.
    page_table:  [B, W] int32, the pages of each row in order (entries past a row's pages are ignored).
    lengths:     [B] int32, tokens of each row already in the cache before this call.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None
    page_table: jax.Array
    lengths: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def with_rows(self, page_table: Int[Array, "B W"], lengths: Int[Array, "B"]) -> "PagedCache":
        return dataclasses.replace(self, page_table=page_table, lengths=lengths)


def resolve_kv_dtype(config: ModelConfig, kv_dtype: str) -> jnp.dtype:
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype must be one of {'|'.join(KV_DTYPES)}, got {kv_dtype!r}")
    if kv_dtype == "auto":
        return jnp.dtype(config.dtype)
    return jnp.dtype(kv_dtype)


def page_bytes(config: ModelConfig, page_size: int, kv_dtype: str = "auto") -> int:
    """Device bytes of one page across all layers (K and V, plus scales when int8)."""
    dt = resolve_kv_dtype(config, kv_dtype)
    per_token = 2 * config.num_layers * config.num_kv_heads * (config.head_dim * dt.itemsize
                                                              + (4 if dt == jnp.int8 else 0))
    return per_token * page_size


def init_paged_cache(config: ModelConfig, num_pages: int, page_size: int, *, kv_dtype: str = "auto",
                     batch: int = 1, max_pages_per_seq: int = 1) -> PagedCache:
    """A zeroed pool of `num_pages` pages and an all-zero page table [batch, max_pages_per_seq]."""
    if num_pages <= 0 or page_size <= 0:
        raise ConfigError(f"num_pages and page_size must be positive, got {num_pages} and {page_size}")
    dt = resolve_kv_dtype(config, kv_dtype)
    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    scales = None
    if dt == jnp.int8:
        scales = jnp.zeros(shape[:-1], jnp.float32)
    return PagedCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), k_scale=scales,
                      v_scale=None if scales is None else jnp.zeros(shape[:-1], jnp.float32),
                      page_table=jnp.zeros((batch, max_pages_per_seq), jnp.int32),
                      lengths=jnp.zeros((batch,), jnp.int32))


def quantize_kv(x: Float[Array, "*lead K H"]) -> tuple[Array, Float[Array, "*lead K"]]:
    """Symmetric int8 per token per head: scale = max|x| / 127 (1 for all-zero rows, which stay zero)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(x32 / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def _write_pages(pool, scale_pool, layer, new, page_ids, offsets):
    """Scatter new [B, T, K, H] into pool[layer, page_ids, offsets]; padding carries page id P (dropped)."""
    if scale_pool is None:
        return pool.at[layer, page_ids, offsets].set(new.astype(pool.dtype), mode="drop"), None
    q, s = quantize_kv(new)
    pool = pool.at[layer, page_ids, offsets].set(q, mode="drop")
    scale_pool = scale_pool.at[layer, page_ids, offsets].set(s, mode="drop")
    return pool, scale_pool


# ---- the interface the layer calls ------------------------------------------------------------------
class Step(NamedTuple):
    """Per-call bookkeeping shared by every layer.

    key_len:  [B] true number of keys of each row after this call (padding excluded).
    k_pos:    dense cache: [B, S] positions of every slot after this call's writes.
    page_ids, offsets: paged cache: [B, T] destination page and slot of each new token (padding -> page P).
    """

    key_len: jax.Array
    k_pos: jax.Array | None = None
    page_ids: jax.Array | None = None
    offsets: jax.Array | None = None
    fresh: bool = False  # paged: the rows held nothing before this call, so the block attends to itself


def default_positions(cache: Any, B: int, T: int) -> Int[Array, "B T"]:
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if isinstance(cache, dict):
        return pos + cache["index"]
    if isinstance(cache, PagedCache):
        return pos + cache.lengths[:, None]
    return pos


def begin(cache: Any, positions: Int[Array, "B T"], fresh: bool = False) -> tuple[Any, Step]:
    """Bookkeeping of one forward call: where the new tokens go and each row's key length afterwards.

    fresh (paged only): every row is empty before this call and its tokens are positions 0.. in order, so the
    block's attention is self-attention over the block (sequence-parallel under a `sequence` mesh axis, the
    flash kernel on TPU/GPU) while its K/V are still written to the pages for the decode that follows."""
    if fresh and not isinstance(cache, PagedCache):
        raise ConfigError("fresh=True is a prefill into an empty paged cache; pass a PagedCache")
    B, _ = positions.shape
    valid_len = jnp.max(jnp.where(positions >= 0, positions + 1, 0), axis=1)  # [B]
    if cache is None:
        return None, Step(key_len=valid_len)
    if isinstance(cache, dict):
        k_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, cache["index"]))
        return cache, Step(key_len=jnp.max(k_pos, axis=1) + 1, k_pos=k_pos)
    if isinstance(cache, PagedCache):
        if cache.page_table.shape[0] != B or cache.lengths.shape != (B,):
            raise ConfigError(f"paged cache rows (page_table {cache.page_table.shape}, lengths "
                              f"{cache.lengths.shape}) must match the token batch {B}; build them with "
                              "cache.with_rows(page_table, lengths)")
        S, P = cache.page_size, cache.num_pages
        valid = positions >= 0
        page_col = jnp.clip(positions // S, 0, cache.page_table.shape[1] - 1)
        page_ids = jnp.where(valid, jnp.take_along_axis(cache.page_table, page_col, axis=1), P)
        offsets = jnp.where(valid, positions % S, 0)
        return cache, Step(key_len=jnp.maximum(cache.lengths, valid_len), page_ids=page_ids, offsets=offsets,
                           fresh=fresh)
    raise ConfigError(f"cache must be None, a dense cache dict (init_cache) or a PagedCache, got {type(cache)}")


def attend(cache: Any, step: Step, layer: Int[Array, ""] | int, q: Float[Array, "B T K G H"],
           k: Float[Array, "B T K H"], v: Float[Array, "B T K H"], positions: Int[Array, "B T"],
           segment_ids: Int[Array, "B T"] | None, config: ModelConfig) -> tuple[Array, Any]:
    """Write this call's k/v into the cache (if any) and attend; returns (attention [B, T, K, G, H], cache)."""
    if cache is None:
        return attention.self_attention(q, k, v, positions, segment_ids, config), None
    if isinstance(cache, dict):
        index = cache["index"]
        ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype)[None], (layer, 0, index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype)[None], (layer, 0, index, 0, 0))
        out = attention.cached_attention(q, ck[layer].astype(q.dtype), cv[layer].astype(q.dtype), positions,
                                         step.k_pos)
        return out, {**cache, "k": ck, "v": cv}
    kp, ks = _write_pages(cache.k, cache.k_scale, layer, k, step.page_ids, step.offsets)
    vp, vs = _write_pages(cache.v, cache.v_scale, layer, v, step.page_ids, step.offsets)
    if step.fresh:
        out = attention.self_attention(q, k, v, positions, None, config)
    else:
        out = attention.paged_attention(q, kp, vp, cache.page_table, step.key_len, positions, layer, ks, vs,
                                        config)
    return out, dataclasses.replace(cache, k=kp, v=vp, k_scale=ks, v_scale=vs)


def end(cache: Any, step: Step, T: int) -> Any:
    """The cache after the call: the dense index advances by T, paged rows by their valid tokens."""
    if cache is None:
        return None
    if isinstance(cache, dict):
        return {**cache, "pos": step.k_pos, "index": cache["index"] + T}
    return dataclasses.replace(cache, lengths=step.key_len)


__all__ = ["DenseCache", "PagedCache", "Step", "KV_DTYPES", "attend", "begin", "default_positions", "end",
           "init_dense_cache", "init_paged_cache", "page_bytes", "quantize_kv", "resolve_kv_dtype"]
