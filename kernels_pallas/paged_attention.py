"""Decode attention over a paged KV cache (page pool + per-sequence page tables), for TPU and GPU, with a
pure-JAX reference beside it.

    out = paged_attention(q [B, T, K, G, H], k_pages [P, page_size, K, H], v_pages [P, page_size, K, H],
                          page_table [B, max_pages], lengths [B], q_positions=[B, T])

Sequence b's token at position p lives in page page_table[b, p // page_size], slot p % page_size; positions
0 .. lengths[b]-1 are filled (the new tokens included). Query t (position q_positions[b, t]) sees the keys at
positions <= its own and < lengths[b]; a query that sees no key (padding, position -1) returns zeros. T is
small: 1 for decode, a few for chunked prefill or speculative checks. Page-table entries past a sequence's
pages are never used for data, so they may hold anything.

int8 KV: pages are int8 and k_scales / v_scales [P, page_size, K] hold one fp32 scale per token and head;
the kernel dequantises in VMEM/registers (value * scale, cast to q's dtype) before the products.

Stacked pools: with `layer` (an int32 scalar, may be traced), k_pages / v_pages are the whole cache
[L, P, page_size, K, H] (scales [L, P, page_size, K]) and the kernel reads layer `layer` in place, so a scan
over layers never copies a layer's pool out of the stack.

Split-K: the pages of a sequence are cut into `num_splits` ranges handled by independent programs; each
writes its partial softmax output and logsumexp, and the partials are combined with weights
exp(lse_s - logsumexp(lse)).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas import _paged_gpu, _paged_tpu
from kernels_pallas._common import (
    MASK_VALUE,
    check_dtype,
    check_power_of_two,
    next_pow2,
    pad_axis,
    resolve_backend,
    resolve_interpret,
    round_up,
)

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    backend: str
    interpret: bool
    sm_scale: float
    page_size: int
    pages_per_block: int
    blocks_per_split: int
    num_splits: int
    groups: int
    quantized: bool
    num_warps: int = 4
    num_stages: int = 2


def _validate(q, k_pages, v_pages, page_table, lengths, q_positions, k_scales, v_scales, layer=None):
    if layer is not None:
        if jnp.shape(layer) != () or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
            raise ValueError(f"layer must be an integer scalar, got {layer!r}")
        if k_pages.ndim != 5 or k_pages.shape != v_pages.shape:
            raise ValueError("with layer=..., k_pages and v_pages must be the stacked pools [L, P, page_size, K, H], "
                             f"got {k_pages.shape}, {v_pages.shape}")
        if k_scales is not None and (k_scales.ndim != 4 or v_scales is None or v_scales.ndim != 4):
            raise ValueError("with layer=..., k_scales / v_scales must be stacked [L, P, page_size, K]")
        k_pages, v_pages = k_pages[0], v_pages[0]
        k_scales = None if k_scales is None else k_scales[0]
        v_scales = None if v_scales is None else v_scales[0]
    if q.ndim != 5:
        raise ValueError(f"q must be [B, T, K, G, H], got {q.shape}")
    B, T, K, _G, H = q.shape
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [P, page_size, K, H], got {k_pages.shape}, "
                         f"{v_pages.shape}")
    P, ps, Kp, Hp = k_pages.shape
    if (Kp, Hp) != (K, H):
        raise ValueError(f"pages hold K={Kp} heads of dim {Hp} but q has K={K}, H={H}")
    if page_table.ndim != 2 or page_table.shape[0] != B or page_table.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 [B={B}, max_pages], got {page_table.dtype} {page_table.shape}")
    if lengths.shape != (B,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths must be int32 [B={B}], got {lengths.dtype} {lengths.shape}")
    if q_positions is None:
        raise ValueError("q_positions [B, T] int32 is required: the position of each query token")
    if q_positions.shape != (B, T) or q_positions.dtype != jnp.int32:
        raise ValueError(f"q_positions must be int32 [B={B}, T={T}], got {q_positions.dtype} {q_positions.shape}")
    check_dtype("q", q, _DTYPES)
    if (k_scales is None) != (v_scales is None):
        raise ValueError("pass both k_scales and v_scales (int8 KV) or neither")
    if k_scales is not None:
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if s.shape != (P, ps, K) or s.dtype != jnp.float32:
                raise ValueError(f"{name} must be float32 [P, page_size, K] = {(P, ps, K)}, got {s.dtype} {s.shape}")
        if k_pages.dtype != jnp.int8 or v_pages.dtype != jnp.int8:
            raise TypeError(f"scales were given, so pages must be int8; got {k_pages.dtype}/{v_pages.dtype}")
    else:
        check_dtype("k_pages", k_pages, _DTYPES)
        check_dtype("v_pages", v_pages, _DTYPES)


def _default_pages_per_block(backend: str, page_size: int) -> int:
    target = 256 if backend == "tpu" else 64  # keys per inner step (TPU steps carry all K heads)
    return max(1, next_pow2(target // page_size) if backend == "gpu" else target // page_size)


def _default_splits(backend: str, B: int, K: int, n_blocks: int) -> int:
    if backend == "gpu":  # enough programs to fill ~132 SMs twice over
        return max(1, min(n_blocks, -(-264 // (B * K))))
    return max(1, min(n_blocks, -(-2 // B)))  # keep both TensorCores of a megacore chip busy


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_block", "num_splits", "backend", "interpret"))
def paged_attention(q: Float[Array, "B T K G H"], k_pages: Array, v_pages: Array,
                    page_table: Int[Array, "B M"], lengths: Int[Array, " B"], *,
                    q_positions: Int[Array, "B T"], k_scales: Array | None = None, v_scales: Array | None = None,
                    layer: Int[Array, ""] | int | None = None, sm_scale: float | None = None,
                    pages_per_block: int | None = None, num_splits: int | None = None, backend: str = "auto",
                    interpret: bool | None = None) -> Float[Array, "B T K G H"]:
    """Attention of a few query tokens per sequence over its pages (see the module docstring)."""
    _validate(q, k_pages, v_pages, page_table, lengths, q_positions, k_scales, v_scales, layer)
    be = resolve_backend(backend)
    interp = resolve_interpret(interpret, be)
    B, T, K, G, H = q.shape
    if layer is None:  # one layer's pool: view it as a stack of one (free reshape)
        k_pages, v_pages = k_pages[None], v_pages[None]
        k_scales = None if k_scales is None else k_scales[None]
        v_scales = None if v_scales is None else v_scales[None]
        layer = 0
    layer_idx = jnp.asarray(layer, jnp.int32).reshape(1)
    ps = k_pages.shape[2]
    M = page_table.shape[1]
    ppb = pages_per_block or _default_pages_per_block(be, ps)
    if ppb < 1:
        raise ValueError(f"pages_per_block must be >= 1, got {ppb}")
    if be == "gpu":
        check_power_of_two("pages_per_block", ppb)
        check_power_of_two("page_size", ps, 16)
    n_blocks = -(-M // ppb)
    splits = num_splits or _default_splits(be, B, K, n_blocks)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    bps = -(-n_blocks // splits)
    splits = -(-n_blocks // bps)
    cfg = PagedConfig(backend=be, interpret=interp, sm_scale=float(H ** -0.5 if sm_scale is None else sm_scale),
                      page_size=ps, pages_per_block=ppb, blocks_per_split=bps, num_splits=splits, groups=G,
                      quantized=k_scales is not None, num_warps=4 if H <= 64 else 8)

    # Query rows of one kv head: r = t * G + g, padded to the backend's tile.
    R = T * G
    R_pad = round_up(R, 16) if be == "tpu" else max(16, next_pow2(R))
    q2 = pad_axis(jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, K, R, H), 2, R_pad)
    row_pos = pad_axis(jnp.repeat(q_positions, G, axis=1), 1, R_pad, -1)
    table = pad_axis(page_table, 1, splits * bps * ppb)
    impl = _paged_tpu if be == "tpu" else _paged_gpu
    o, lse = impl.paged_partials(q2, k_pages, v_pages, k_scales, v_scales, table, lengths, row_pos, layer_idx, cfg)
    out = combine_splits(o, lse)  # [B, K, R_pad, H]
    out = out[:, :, :R].reshape(B, K, T, G, H)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).astype(q.dtype)


def combine_splits(o: Float[Array, "B K N R H"], lse: Float[Array, "B K N R"]) -> Float[Array, "B K R H"]:
    """Merge per-split softmax outputs: weights exp(lse_s - max lse); rows no split saw (-inf) give 0."""
    m = jnp.max(lse, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # 0 for splits that saw no key
    denom = jnp.sum(w, axis=2)
    num = jnp.sum(w[..., None] * o, axis=2)
    return jnp.where(denom[..., None] > 0, num / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)


def gather_pages(pages: Array, scales: Array | None, page_table: Array, dtype, layer: Array | int | None = None
                 ) -> Array:
    """[B, max_pages * page_size, K, H] in `dtype` (dequantised when scales are given). With `layer`, pages
    and scales are the stacked pools and the rows are gathered from that layer in place (no layer copy)."""
    P, ps, K, H = pages.shape[-4:]
    B, M = page_table.shape
    tbl = jnp.clip(page_table, 0, P - 1)
    idx = tbl if layer is None else (layer, tbl)
    x = pages[idx].reshape(B, M * ps, K, H)
    if scales is not None:
        s = scales[idx].reshape(B, M * ps, K, 1)
        return (x.astype(jnp.float32) * s).astype(dtype)
    return x.astype(dtype)


SMALL_T = 4  # query blocks this short (decode) use the multiply-reduce form in the reference


def _small_t_attention(q, k, v, mask, scale):
    """The reference's math for a few queries per row as broadcast multiply + reduce in fp32: XLA fuses it
    into one pass over K and one over V, where the batched-dot form first transposes the gathered keys
    (3x slower on CPU for decode at batch 64)."""
    f32 = jnp.float32
    scores = jnp.sum(q.astype(f32)[:, :, None] * k.astype(f32)[:, None, :, :, None, :], axis=-1) * scale
    scores = jnp.where(mask[:, :, :, None, None], scores, MASK_VALUE)  # [B, T, S, K, G]
    probs = jax.nn.softmax(scores, axis=2)
    return jnp.sum(probs[..., None] * v.astype(f32)[:, None, :, :, None, :], axis=2)  # [B, T, K, G, H]


BLOCK_KEYS = 2048  # prefill chunks over more keys than this attend block by block (memory bounded by the block)


def _blockwise(q, k_pages, v_pages, k_scales, v_scales, page_table, lengths, q_positions, layer, scale):
    """The reference for long key ranges: an online softmax over blocks of pages (lax.scan), so the live
    scores are [B, K, G, T, BLOCK_KEYS] whatever the context length (a 200K-token prompt prefilled in
    chunks needs no [T, 200K] matrix). Same result as the one-block form up to fp32 rounding."""
    B, T, K, G, H = q.shape
    page_size = k_pages.shape[-3]
    W = page_table.shape[1]
    ppb = max(1, BLOCK_KEYS // page_size)
    nb = -(-W // ppb)
    table = jnp.pad(page_table, ((0, 0), (0, nb * ppb - W)))  # pad entries sit past every row's length
    blocks = jnp.transpose(table.reshape(B, nb, ppb), (1, 0, 2))  # [nb, B, ppb]
    f32 = jnp.float32

    longest = jnp.max(lengths)

    def step(carry, xs):
        # Blocks past every row's length (the causal future of a chunked prefill) are skipped.
        return jax.lax.cond(xs[1] * ppb * page_size < longest, attend_block, lambda c, _: c, carry, xs), None

    def attend_block(carry, xs):
        m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
        tbl, i = xs
        k = gather_pages(k_pages, k_scales, tbl, q.dtype, layer)  # [B, ppb * page_size, K, H]
        v = gather_pages(v_pages, v_scales, tbl, q.dtype, layer)
        pos = i * ppb * page_size + jnp.arange(ppb * page_size, dtype=jnp.int32)
        filled = pos[None, :] < lengths[:, None]
        mask = filled[:, None, :] & (pos[None, None, :] <= q_positions[:, :, None])  # [B, T, Sb]
        v = jnp.where(filled[:, :, None, None], v, 0)
        s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=f32) * scale
        s = jnp.where(mask[:, None, None], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v,
                                                 preferred_element_type=f32)
        return m_new, l, acc

    init = (jnp.full((B, K, G, T), MASK_VALUE, f32), jnp.zeros((B, K, G, T), f32), jnp.zeros((B, K, G, T, H), f32))
    (_, l, acc), _ = jax.lax.scan(step, init, (blocks, jnp.arange(nb, dtype=jnp.int32)))
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)  # unseen rows: 0
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q.dtype)  # [B, T, K, G, H]


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_block", "num_splits", "backend", "interpret"))
def paged_attention_reference(q: Float[Array, "B T K G H"], k_pages: Array, v_pages: Array,
                              page_table: Int[Array, "B M"], lengths: Int[Array, " B"], *,
                              q_positions: Int[Array, "B T"], k_scales: Array | None = None,
                              v_scales: Array | None = None, layer: Int[Array, ""] | int | None = None,
                              sm_scale: float | None = None, pages_per_block: int | None = None,
                              num_splits: int | None = None, backend: str = "auto",
                              interpret: bool | None = None) -> Float[Array, "B T K G H"]:
    """Gather every page of every sequence and run dense masked attention (same semantics as the kernel)."""
    del pages_per_block, num_splits, backend, interpret
    _validate(q, k_pages, v_pages, page_table, lengths, q_positions, k_scales, v_scales, layer)
    H = q.shape[-1]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    page_size = k_pages.shape[-3]
    W = page_table.shape[1]
    keys = W * page_size
    if keys > BLOCK_KEYS and (q.shape[1] > SMALL_T or keys > 8 * BLOCK_KEYS):  # long: memory-bounded blocks
        return _blockwise(q, k_pages, v_pages, k_scales, v_scales, page_table, lengths, q_positions, layer, scale)
    k = gather_pages(k_pages, k_scales, page_table, q.dtype, layer)  # [B, S, K, H]
    v = gather_pages(v_pages, v_scales, page_table, q.dtype, layer)
    pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    filled = pos[None, :] < lengths[:, None]  # [B, S]
    mask = filled[:, None, :] & (pos[None, None, :] <= q_positions[:, :, None])  # [B, T, S]
    v = jnp.where(filled[:, :, None, None], v, 0)  # stale / unowned slots may hold NaN: 0 * NaN is NaN
    if q.shape[1] <= SMALL_T:
        out = _small_t_attention(q, k, v, mask, scale)
    else:
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    seen = jnp.any(mask, axis=-1)[:, :, None, None, None]  # [B, T, 1, 1, 1]
    return jnp.where(seen, out, 0.0).astype(q.dtype)
