"""Flash attention for NVIDIA GPUs (Pallas Triton): forward, dQ and dK/dV kernels.

Layouts are the public ones, padded: q, o, dO [B, Tp, K, G, H]; k, v [B, Sp, K, H]; lse, delta [B, K, G, Tp];
segment ids [B, Tp] / [B, Sp]. The grid runs one program per (query block, batch, query head); the head's
index map picks kv head n // G, so K/V are never repeated in memory (the G programs of a group share them
through L2). The dK/dV program of a kv head loops over its G query heads and accumulates their contributions.
Key blocks outside the causal / sliding-window band are never visited (loop bounds, not masks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas._flash_common import (
    MASK,
    FlashConfig,
    block_mask,
    kv_block_range,
    q_block_range,
    tile_needs_mask,
)

_NT = (((1,), (1,)), ((), ()))


def _dot_nt(a, b):
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot(a, b, preferred_element_type=jnp.float32)


def _mask(cfg, q0, k0, bq, bk, q_seg, k_seg):
    q_idx = q0 + jnp.arange(bq, dtype=jnp.int32)[:, None]
    k_idx = k0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
    return block_mask(cfg, q_idx, k_idx, None if q_seg is None else q_seg[:, None],
                      None if k_seg is None else k_seg[None, :])


def _tile(cfg, q0, bq, k0, bk, step, carry):
    """step(masked, carry) for one tile; the iota/compare/select work only where the tile needs it."""
    needs = tile_needs_mask(cfg, q0, bq, k0, bk)
    if isinstance(needs, bool):
        return step(needs, carry)
    return lax.cond(needs, functools.partial(step, True), functools.partial(step, False), carry)


def _params(cfg: FlashConfig):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _unpack(refs, n_in: int, has_seg: bool):
    if has_seg:
        return refs[:n_in], refs[n_in:]
    return tuple(refs[:3]) + (None, None) + tuple(refs[3:n_in - 2]), refs[n_in - 2:]


# ---------------------------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, cfg: FlashConfig):
    (q_ref, k_ref, v_ref, qs_ref, ks_ref), (o_ref, lse_ref) = _unpack(refs, 5, cfg.has_segments)
    bq, H = q_ref.shape
    bk = cfg.block_k
    i = pl.program_id(0)
    q = q_ref[...]
    q_seg = qs_ref[...] if qs_ref is not None else None

    def step(j, masked, carry):
        acc, m, l = carry
        ks = pl.ds(j * bk, bk)
        s = _dot_nt(q, k_ref[ks, :]) * cfg.sm_scale
        if masked:
            mask = _mask(cfg, i * bq, j * bk, bq, bk, q_seg, ks_ref[ks] if ks_ref is not None else None)
            s = jnp.where(mask, s, MASK)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_next[:, None])
        alpha = jnp.exp(m - m_next)  # rescales what was accumulated under the old maximum
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * l + jnp.sum(p, axis=1)

    def body(j, carry):
        return _tile(cfg, i * bq, bq, j * bk, bk, functools.partial(step, j), carry)

    lo, hi = kv_block_range(cfg, i, bq, bk)
    init = (jnp.zeros((bq, H), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi + 1, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _seg_in_specs(cfg, q_map, bq, k_map, bk):
    if not cfg.has_segments:
        return []
    return [pl.BlockSpec((None, bq), q_map), pl.BlockSpec((None, bk), k_map)]


def forward(q, k, v, q_seg, kv_seg, cfg: FlashConfig):
    B, Tp, K, G, H = q.shape
    Sp = k.shape[1]
    bq = cfg.block_q
    grid = (Tp // bq, B, K * G)
    q_spec = pl.BlockSpec((None, bq, None, None, H), lambda i, b, n: (b, i, n // G, n % G, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda i, b, n: (b, 0, n // G, 0))
    lse_spec = pl.BlockSpec((None, None, None, bq), lambda i, b, n: (b, n // G, n % G, i))
    segs = [q_seg, kv_seg] if cfg.has_segments else []
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec,
                  *_seg_in_specs(cfg, lambda i, b, n: (b, i), bq, lambda i, b, n: (b, 0), Sp)],
        out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, K, G, Tp), jnp.float32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="flash_attention_fwd_gpu",
    )(q, k, v, *segs)
    return o, lse


# ---------------------------------------------------------------------------------------------- dQ
def _dq_kernel(*refs, cfg: FlashConfig):
    (q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, di_ref), (dq_ref,) = _unpack(refs, 8, cfg.has_segments)
    bq, H = q_ref.shape
    bk = cfg.block_k_dq
    i = pl.program_id(0)
    q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], di_ref[...]
    q_seg = qs_ref[...] if qs_ref is not None else None

    def step(j, masked, dq):
        ks = pl.ds(j * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s = _dot_nt(q, k) * cfg.sm_scale
        p = jnp.exp(s - lse[:, None])  # probabilities from the saved logsumexp
        if masked:
            p = jnp.where(_mask(cfg, i * bq, j * bk, bq, bk, q_seg, ks_ref[ks] if ks_ref is not None else None),
                          p, 0.0)
        ds = p * (_dot_nt(do, v) - di[:, None]) * cfg.sm_scale
        return dq + _dot(ds.astype(k.dtype), k)

    def body(j, dq):
        return _tile(cfg, i * bq, bq, j * bk, bk, functools.partial(step, j), dq)

    lo, hi = kv_block_range(cfg, i, bq, bk)
    dq = lax.fori_loop(lo, hi + 1, body, jnp.zeros((bq, H), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def backward_dq(q, k, v, q_seg, kv_seg, do, lse, di, cfg: FlashConfig):
    B, Tp, K, G, H = q.shape
    Sp = k.shape[1]
    bq = cfg.block_q_dq
    q_spec = pl.BlockSpec((None, bq, None, None, H), lambda i, b, n: (b, i, n // G, n % G, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda i, b, n: (b, 0, n // G, 0))
    row_spec = pl.BlockSpec((None, None, None, bq), lambda i, b, n: (b, n // G, n % G, i))
    segs = [q_seg, kv_seg] if cfg.has_segments else []
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(Tp // bq, B, K * G),
        in_specs=[q_spec, kv_spec, kv_spec,
                  *_seg_in_specs(cfg, lambda i, b, n: (b, i), bq, lambda i, b, n: (b, 0), Sp),
                  q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="flash_attention_dq_gpu",
    )(q, k, v, *segs, do, lse, di)


# ---------------------------------------------------------------------------------------------- dK, dV
def _dkv_kernel(*refs, cfg: FlashConfig):
    ins, (dk_ref, dv_ref) = _unpack(refs, 8, cfg.has_segments)
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, di_ref = ins
    bk, H = k_ref.shape
    bq = cfg.block_q_dkv
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_seg = ks_ref[...] if ks_ref is not None else None
    lo, hi = q_block_range(cfg, j, bq, bk)

    def group_body(g, carry):
        def step(i, masked, carry):
            dk, dv = carry
            qs = pl.ds(i * bq, bq)
            q, do = q_ref[qs, g, :], do_ref[qs, g, :]
            lse, di = lse_ref[g, qs], di_ref[g, qs]
            s = _dot_nt(q, k) * cfg.sm_scale
            p = jnp.exp(s - lse[:, None])
            if masked:  # also keeps out rows whose keys are all masked (padding: lse ~ MASK)
                p = jnp.where(_mask(cfg, i * bq, j * bk, bq, bk, qs_ref[qs] if qs_ref is not None else None, k_seg),
                              p, 0.0)
            dv = dv + _dot(p.T.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - di[:, None]) * cfg.sm_scale
            return dk + _dot(ds.T.astype(q.dtype), q), dv

        def body(i, carry):
            return _tile(cfg, i * bq, bq, j * bk, bk, functools.partial(step, i), carry)

        return lax.fori_loop(lo, hi + 1, body, carry)

    zeros = jnp.zeros((bk, H), jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.groups, group_body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkv(q, k, v, q_seg, kv_seg, do, lse, di, cfg: FlashConfig):
    B, Tp, K, G, H = q.shape
    Sp = k.shape[1]
    bk = cfg.block_k_dkv
    q_spec = pl.BlockSpec((None, Tp, None, G, H), lambda j, b, h: (b, 0, h, 0, 0))
    row_spec = pl.BlockSpec((None, None, G, Tp), lambda j, b, h: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, h: (b, j, h, 0))
    segs = [q_seg, kv_seg] if cfg.has_segments else []
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(Sp // bk, B, K),
        in_specs=[q_spec, kv_spec, kv_spec,
                  *_seg_in_specs(cfg, lambda j, b, h: (b, 0), Tp, lambda j, b, h: (b, j), bk),
                  q_spec, row_spec, row_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="flash_attention_dkv_gpu",
    )(q, k, v, *segs, do, lse, di)
