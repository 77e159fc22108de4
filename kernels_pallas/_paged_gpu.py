"""Paged decode attention for NVIDIA GPUs (Pallas Triton).

One program per (sequence, kv head, split): it walks the split's pages `pages_per_block` at a time, gathering
them by page-table index straight from the stacked pool (viewed as [L, P, page_size, K*H]; the layer index
comes in as a one-element array), and keeps the online-softmax
state in registers. All G*T query rows of the kv head share each K/V load.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas._common import MASK_VALUE

_NT = (((1,), (1,)), ((), ()))


def _kernel(q_ref, pos_ref, len_ref, table_ref, layer_ref, k_ref, v_ref, *refs, cfg, num_pages: int):
    if cfg.quantized:
        ks_ref, vs_ref, o_ref, lse_ref = refs
    else:
        (o_ref, lse_ref), ks_ref, vs_ref = refs, None, None
    h, s = pl.program_id(1), pl.program_id(2)
    R, H = q_ref.shape
    ps, ppb = cfg.page_size, cfg.pages_per_block
    bk = ppb * ps
    length = len_ref[0]
    q = q_ref[...]
    row_pos = pos_ref[...]
    heads = pl.ds(h * H, H)
    layer = layer_ref[0]

    def load(ref, scale_ref, pages):
        x = ref[layer, pages, :, heads].reshape(bk, H)
        if scale_ref is None:
            return x.astype(q.dtype)
        sc = scale_ref[layer, pages, :, h].reshape(bk)
        return (x.astype(jnp.float32) * sc[:, None]).astype(q.dtype)

    def body(blk, carry):
        acc, m, l = carry
        pages = jnp.clip(table_ref[pl.ds(blk * ppb, ppb)], 0, num_pages - 1)
        k = load(k_ref, ks_ref, pages)
        v = load(v_ref, vs_ref, pages)
        kpos = blk * bk + jnp.arange(bk, dtype=jnp.int32)
        mask = (kpos[None, :] < length) & (kpos[None, :] <= row_pos[:, None])
        sc = jnp.where(mask, lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.sm_scale,
                       MASK_VALUE)  # the where also drops NaN read from stale slots
        m_next = jnp.maximum(m, jnp.max(sc, axis=1))
        p = jnp.where(mask, jnp.exp(sc - m_next[:, None]), 0.0)
        alpha = jnp.exp(m - m_next)
        v = jnp.where((kpos < length)[:, None], v, jnp.zeros_like(v))  # 0 * NaN would still be NaN
        acc = acc * alpha[:, None] + lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_next, alpha * l + jnp.sum(p, axis=1)

    first = s * cfg.blocks_per_split
    n_blocks = (length + bk - 1) // bk
    last = jnp.minimum(first + cfg.blocks_per_split, n_blocks)
    init = (jnp.zeros((R, H), jnp.float32), jnp.full((R,), MASK_VALUE, jnp.float32), jnp.zeros((R,), jnp.float32))
    acc, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = acc / safe_l[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def paged_partials(q2, k_pages, v_pages, k_scales, v_scales, table, lengths, row_pos, layer, cfg):
    """Per-split outputs o [B, K, splits, R, H] (fp32, normalised) and lse [B, K, splits, R].

    k_pages / v_pages: stacked [L, P, page_size, K, H]; layer: int32 [1]."""
    B, K, R, H = q2.shape
    L, P, ps = k_pages.shape[:3]
    M = table.shape[1]
    ns = cfg.num_splits
    pool = pl.BlockSpec((L, P, ps, K * H), lambda b, h, s: (0, 0, 0, 0))
    in_specs = [pl.BlockSpec((None, None, R, H), lambda b, h, s: (b, h, 0, 0)),
                pl.BlockSpec((None, R), lambda b, h, s: (b, 0)),
                pl.BlockSpec((1,), lambda b, h, s: (b,)),
                pl.BlockSpec((None, M), lambda b, h, s: (b, 0)),
                pl.BlockSpec((1,), lambda b, h, s: (0,)),
                pool, pool]
    inputs = [q2, row_pos, lengths, table, layer, k_pages.reshape(L, P, ps, K * H), v_pages.reshape(L, P, ps, K * H)]
    if cfg.quantized:
        in_specs += [pl.BlockSpec((L, P, ps, K), lambda b, h, s: (0, 0, 0, 0))] * 2
        inputs += [k_scales, v_scales]
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, num_pages=P),
        grid=(B, K, ns),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, R, H), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, R), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, ns, R, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, ns, R), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="paged_attention_gpu",
    )(*inputs)
