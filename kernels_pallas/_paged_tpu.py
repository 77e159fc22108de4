"""Paged decode attention for TPU (Mosaic).

Grid (B, splits, blocks_per_split); the last axis is sequential with the running softmax statistics of every
kv head in VMEM scratch. Page table, lengths and the layer index are scalar-prefetched into SMEM so the index
maps can address pages: each grid step fetches `pages_per_block` whole pages (all K heads: one contiguous
page_size x K*H tile of the stacked pool viewed as [L, P, page_size, K*H]), each page through its own
BlockSpec on the same pool, and loops over the heads in VMEM. Whole-page DMAs keep transfers large for
memory-bound decode. Steps past a sequence's last page repeat the last page index (no new DMA) and skip
compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._common import MASK_VALUE, TPU_LANES

_NT = (((1,), (1,)), ((), ()))


def _lanes(x, width):
    if width == TPU_LANES:
        return x
    if width < TPU_LANES:
        return x[:, :width]
    return jnp.tile(x, (1, width // TPU_LANES))


def _head(page_ref, scale_ref, h: int, H: int, dtype):
    """kv head h of one page as [page_size, H] in `dtype`; int8 pages times their per-token scale."""
    x = page_ref[:, h * H:(h + 1) * H]
    if scale_ref is None:
        return x.astype(dtype)
    return (x.astype(jnp.float32) * scale_ref[:, h:h + 1]).astype(dtype)


def _kernel(lengths_ref, table_ref, layer_ref, q_ref, pos_ref, *refs, cfg):
    ppb = cfg.pages_per_block
    k_refs, v_refs = refs[:ppb], refs[ppb:2 * ppb]
    n = 2 * ppb
    if cfg.quantized:
        ks_refs, vs_refs = refs[n:n + ppb], refs[n + ppb:n + 2 * ppb]
        n += 2 * ppb
    else:
        ks_refs = vs_refs = (None,) * ppb
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[n:]
    b, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    K, R, H = q_ref.shape
    bk = ppb * cfg.page_size
    length = lengths_ref[b]
    start = (s * cfg.blocks_per_split + j) * bk  # first key position of this step

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(start < length)
    def _step():
        kpos = start + jax.lax.broadcasted_iota(jnp.int32, (R, bk), 1)
        mask = (kpos < length) & (kpos <= pos_ref[...])  # pos_ref: [R, 1] query positions
        filled = (start + jax.lax.broadcasted_iota(jnp.int32, (bk, H), 0)) < length
        for h in range(K):  # static: lane-aligned slices of the page tiles when H % 128 == 0
            q = q_ref[h]
            k = [_head(k_refs[c], ks_refs[c], h, H, q.dtype) for c in range(ppb)]
            v = [_head(v_refs[c], vs_refs[c], h, H, q.dtype) for c in range(ppb)]
            k = k[0] if ppb == 1 else jnp.concatenate(k, axis=0)  # [bk, H]
            v = v[0] if ppb == 1 else jnp.concatenate(v, axis=0)
            sc = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.sm_scale  # [R, bk]
            sc = jnp.where(mask, sc, MASK_VALUE)  # also drops NaN read from stale slots
            m_prev, l_prev = m_scr[h], l_scr[h]
            m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(sc - _lanes(m_next, bk)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_scr[h] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            m_scr[h] = m_next
            v = jnp.where(filled, v, jnp.zeros_like(v))  # p is 0 there, but 0 * NaN would still be NaN
            pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_scr[h] = acc_scr[h] * _lanes(alpha, H) + pv

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        for h in range(K):
            l = l_scr[h]
            seen = l > 0
            o_ref[h] = acc_scr[h] / _lanes(jnp.where(seen, l, 1.0), H)
            lse_ref[h] = jnp.where(seen, m_scr[h] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[:, :1]


def paged_partials(q2, k_pages, v_pages, k_scales, v_scales, table, lengths, row_pos, layer, cfg):
    """Per-split outputs o [B, K, splits, R, H] (fp32, normalised) and lse [B, K, splits, R].

    k_pages / v_pages: stacked [L, P, page_size, K, H]; layer: int32 [1]."""
    B, K, R, H = q2.shape
    L, P, ps = k_pages.shape[:3]
    ppb, bps, ns = cfg.pages_per_block, cfg.blocks_per_split, cfg.num_splits
    M = table.shape[1]

    def page(c, b, s, j, lengths_ref, table_ref):
        n_pages = jax.lax.div(lengths_ref[b] + ps - 1, ps)  # lengths >= 0: no floor-division fix-up
        logical = jnp.minimum((s * bps + j) * ppb + c, jnp.maximum(n_pages - 1, 0))
        return jnp.clip(table_ref[b * M + logical], 0, P - 1)

    def pool_spec(c, width):
        def index(b, s, j, lengths_ref, table_ref, layer_ref):
            return layer_ref[0], page(c, b, s, j, lengths_ref, table_ref), 0, 0
        return pl.BlockSpec((None, None, ps, width), index)

    kv_specs = [pool_spec(c, K * H) for c in range(ppb)]
    inputs = [q2, row_pos[:, :, None], *([k_pages.reshape(L, P, ps, K * H)] * ppb),
              *([v_pages.reshape(L, P, ps, K * H)] * ppb)]
    in_specs = [pl.BlockSpec((None, K, R, H), lambda b, s, j, *pre: (b, 0, 0, 0)),
                pl.BlockSpec((None, R, 1), lambda b, s, j, *pre: (b, 0, 0)), *kv_specs, *kv_specs]
    if cfg.quantized:
        scale_specs = [pool_spec(c, K) for c in range(ppb)]
        inputs += [k_scales] * ppb + [v_scales] * ppb
        in_specs += scale_specs + scale_specs
    out_spec = pl.BlockSpec((None, K, None, R, H), lambda b, s, j, *pre: (b, 0, s, 0, 0))
    lse_spec = pl.BlockSpec((None, K, None, R, 1), lambda b, s, j, *pre: (b, 0, s, 0, 0))
    o, lse = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(B, ns, bps), in_specs=in_specs, out_specs=[out_spec, lse_spec],
            scratch_shapes=[pltpu.VMEM((K, R, TPU_LANES), jnp.float32), pltpu.VMEM((K, R, TPU_LANES), jnp.float32),
                            pltpu.VMEM((K, R, H), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, K, ns, R, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, ns, R, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="paged_attention_tpu",
    )(lengths, table.reshape(-1), layer, *inputs)
    return o, lse[..., 0]
