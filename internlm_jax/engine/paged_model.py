"""The InternLM2 forward over a paged KV cache (the serving path of `model.forward`).

The cache is a pool of fixed-size pages per layer, `k`/`v` [L, P, S, K, H] (here S is the page size), shared
by every sequence; a sequence owns a list of pages (a row of `page_table` [B, W]) and its token at position
`p` lives in page `page_table[b, p // S]`, slot `p % S`. A forward call writes the K/V of its new tokens into
their pages (a scatter) and then attends over each row's pages (a gather in the reference path, the Pallas
paged-attention kernel on TPU/GPU).

With `kv_dtype="int8"` the pool holds int8 values with one fp32 scale per token per kv head
(`k_scale`/`v_scale` [L, P, S, K]): symmetric, scale = max|x| / 127 over the head dim. Keys and values are
quantized once when written and dequantized when read, so a token sees the same (quantized) K/V of itself in
the step that writes it as in every later step.

Rotary embeddings follow the dense path: with dynamic NTK scaling each row's base uses that row's total key
length after this call; keys written earlier keep the rotation they were written with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.layers import MASK_VALUE, apply_rope, linear, reference_attention, rms_norm, rope_tables
from internlm_jax.model import block_output
from internlm_jax.sharding import constrain

KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
INT8_MAX = 127.0


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


def dequantize_kv(q: Array, scale: Array | None, dtype: jnp.dtype) -> Array:
    if scale is None:
        return q.astype(dtype)
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def paged_attention_reference(q: Float[Array, "B T K G H"], k_pages: Array, v_pages: Array,
                              page_table: Int[Array, "B W"], lengths: Int[Array, "B"], *,
                              q_positions: Int[Array, "B T"], k_scales: Array | None = None,
                              v_scales: Array | None = None, layer: Int[Array, ""] | None = None
                              ) -> Float[Array, "B T K G H"]:
    """Gather each row's pages [P, S, K, H] -> [B, W*S, K, H] and attend causally by position.

    lengths: keys valid per row (after this call's writes); the key at gathered index j has position j.
    Queries with position -1 (padding) see no key and return a finite, meaningless row.
    layer: when given, the pools are the whole [L, P, S, K, H] stack and pages are gathered from that layer
    directly (no copy of the layer's pool first).
    """
    B, W = page_table.shape
    S = k_pages.shape[-3]
    idx = page_table if layer is None else (layer, page_table)
    k = dequantize_kv(k_pages[idx], None if k_scales is None else k_scales[idx], q.dtype)
    v = dequantize_kv(v_pages[idx], None if v_scales is None else v_scales[idx], q.dtype)
    k = k.reshape(B, W * S, *k.shape[3:])
    v = v.reshape(B, W * S, *v.shape[3:])
    k = constrain(k, ("batch", None, "act_kv_heads", None))
    v = constrain(v, ("batch", None, "act_kv_heads", None))
    k_pos = jnp.arange(W * S, dtype=jnp.int32)
    live = k_pos[None, :] < lengths[:, None]  # [B, W*S]
    # Slots past a row's length belong to other sequences or were never written: zero V there, so even a
    # NaN in them cannot leak through a zero probability (0 * NaN = NaN).
    v = jnp.where(live[:, :, None, None], v, jnp.zeros((), v.dtype))
    mask = (k_pos[None, None, :] <= q_positions[:, :, None]) & live[:, None, :]
    if q.shape[1] <= SMALL_T:
        return _small_t_attention(q, k, v, mask)
    return reference_attention(q, k, v, mask)


SMALL_T = 4  # query blocks this short (decode) use the multiply-reduce form below


def _small_t_attention(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
                       mask: jax.Array) -> Float[Array, "B T K G H"]:
    """reference_attention for a few queries per row, as broadcast multiply + reduce in fp32.

    Same math; XLA fuses it into one pass over K and one over V, where the batched dot of the einsum form
    first transposes the gathered keys (3x slower on CPU for decode, measured at batch 64)."""
    f32 = jnp.float32
    scale = q.shape[-1] ** -0.5
    scores = jnp.sum(q.astype(f32)[:, :, None] * k.astype(f32)[:, None, :, :, None, :], axis=-1) * scale
    scores = jnp.where(mask[:, :, :, None, None], scores, MASK_VALUE)  # [B, T, S, K, G]
    probs = jax.nn.softmax(scores, axis=2)
    out = jnp.sum(probs[..., None] * v.astype(f32)[:, None, :, :, None, :], axis=2)  # [B, T, K, G, H]
    return out.astype(q.dtype)


KERNEL_MAX_T = 16  # the Pallas kernel is for decode-sized query blocks; longer prefill chunks use the gather


def _attention_impl(config: ModelConfig, T: int) -> str:
    impl = config.attention_impl
    if impl == "auto":
        if jax.default_backend() not in ("tpu", "gpu") or T > KERNEL_MAX_T:
            return "reference"
        try:
            import kernels_pallas.paged_attention  # noqa: F401
        except ImportError:
            return "reference"
        return "pallas"
    return impl


def paged_attention(config: ModelConfig, q, k_pool, v_pool, page_table, lengths, q_positions, layer,
                    k_scale_pool=None, v_scale_pool=None):
    """Dispatch on config.attention_impl: "auto" = the Pallas kernel on TPU/GPU for decode-sized T, else the
    gather reference; "pallas" forces the kernel (interpret mode on CPU). The pools are the whole
    [L, P, S, K, H] stacks and `layer` selects one, read in place by either path."""
    if _attention_impl(config, q.shape[1]) == "pallas":
        try:
            from kernels_pallas.paged_attention import paged_attention as kernel
        except ImportError as e:
            raise ConfigError("attention_impl='pallas' needs kernels_pallas/paged_attention.py, which failed to "
                              f"import ({e}); use attention_impl='reference' or 'auto'") from e
        return kernel(q, k_pool, v_pool, page_table, lengths, q_positions=q_positions, k_scales=k_scale_pool,
                      v_scales=v_scale_pool, layer=layer)
    return paged_attention_reference(q, k_pool, v_pool, page_table, lengths, q_positions=q_positions,
                                     k_scales=k_scale_pool, v_scales=v_scale_pool, layer=layer)


def _write_pages(pool, scale_pool, layer, new, page_ids, offsets):
    """Scatter new [B, T, K, H] into pool[layer, page_ids, offsets]; padding rows carry page id P (dropped)."""
    if scale_pool is None:
        return pool.at[layer, page_ids, offsets].set(new.astype(pool.dtype), mode="drop"), None
    q, s = quantize_kv(new)
    pool = pool.at[layer, page_ids, offsets].set(q, mode="drop")
    scale_pool = scale_pool.at[layer, page_ids, offsets].set(s, mode="drop")
    return pool, scale_pool


def paged_forward(params: dict[str, Any], tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None, *,
                  config: ModelConfig, cache: PagedCache, return_hidden: bool = False,
                  logits_index: Int[Array, "B"] | None = None) -> tuple[Array, PagedCache]:
    """Run `tokens` through the model, writing their K/V into the pages of `cache.page_table`.

    positions: per token; valid tokens of row b sit at cache.lengths[b], +1, ... in order; -1 marks padding
    (not written, output meaningless). None means cache.lengths[b] + arange(T) for every token.
    logits_index: [B] index into T; when given, only those tokens' logits are computed ([B, V] instead of
    [B, T, V]; the serving step needs one token per row). Returns (logits or hidden, cache with lengths
    advanced by each row's number of valid tokens).
    """
    B, T = tokens.shape
    dtype = jnp.dtype(config.dtype)
    if cache.page_table.shape[0] != B or cache.lengths.shape != (B,):
        raise ConfigError(f"paged cache rows (page_table {cache.page_table.shape}, lengths {cache.lengths.shape}) "
                          f"must match the token batch {B}; build them with cache.with_rows(page_table, lengths)")
    if positions is None:
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    positions = positions.astype(jnp.int32)
    S = cache.page_size
    P = cache.num_pages
    valid = positions >= 0
    new_lengths = jnp.maximum(cache.lengths, jnp.max(jnp.where(valid, positions + 1, 0), axis=1))
    # Destination of each new token; padding goes to page P, which the scatter drops.
    page_col = jnp.clip(positions // S, 0, cache.page_table.shape[1] - 1)
    page_ids = jnp.where(valid, jnp.take_along_axis(cache.page_table, page_col, axis=1), P)
    offsets = jnp.where(valid, positions % S, 0)

    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    cos, sin = rope_tables(config, positions, new_lengths[:, None, None])
    G = config.groups

    def body(carry, layer_in):
        x, kp, vp, ks, vs = carry
        lp, layer = layer_in
        h = rms_norm(x, lp["attention_norm"], config.rms_norm_eps)
        qkv = linear(h, lp["wqkv"], "D", "KQH", dtype)  # [B, T, K, G+2, H]
        qkv = constrain(qkv, ("batch", "length", "act_kv_heads", None, None))
        q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        kp, ks = _write_pages(kp, ks, layer, k, page_ids, offsets)
        vp, vs = _write_pages(vp, vs, layer, v, page_ids, offsets)
        attn = paged_attention(config, q, kp, vp, cache.page_table, new_lengths, positions, layer, ks, vs)
        x = block_output(config, x, lp, attn)
        return (x, kp, vp, ks, vs), None

    # The pool rides in the scan carry so each layer's scatter updates it in place (as xs/ys the whole pool
    # would be copied every step).
    carry = (x, cache.k, cache.v, cache.k_scale, cache.v_scale)
    layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x, kp, vp, ks, vs), _ = jax.lax.scan(body, carry, (params["layers"], layer_ids))
    new_cache = dataclasses.replace(cache, k=kp, v=vp, k_scale=ks, v_scale=vs, lengths=new_lengths)

    if logits_index is not None:
        x = jnp.take_along_axis(x, logits_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]  # [B, D]
    x = rms_norm(x, params["norm"], config.rms_norm_eps)
    if return_hidden:
        return x, new_cache
    logits = linear(x, params["output"], "D", "V", dtype).astype(jnp.float32)
    names = ("batch", "act_vocab") if logits_index is not None else ("batch", "length", "act_vocab")
    return constrain(logits, names), new_cache
