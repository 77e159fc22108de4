"""Flash attention for TPU (Mosaic): forward, dK/dV and dQ kernels.

Layouts: q, o, dO [B, K, G, Tp, H]; k, v [B, K, Sp, H]; lse, delta [B, K, G, Tp, 1]; segment ids
[B, Tp, 1] (queries) and [B, 1, Sp] (keys). All G query heads of a kv group are one tile of G*bq rows, so each
K/V block is read once per group (GQA without repeating K/V). The key axis (forward, dQ) or the query axis (dK/dV)
is the innermost, sequential grid axis; running statistics live in VMEM scratch. Blocks outside the causal /
sliding-window band are skipped, and their index maps repeat the last fetched block so no DMA is issued.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._common import TPU_LANES
from kernels_pallas._flash_common import (
    MASK,
    FlashConfig,
    block_mask,
    clamp_block,
    kv_block_range,
    q_block_range,
    tile_needs_mask,
)

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


def _lanes(x: jax.Array, width: int) -> jax.Array:
    """Stats kept lane-replicated as [N, 128] widened/narrowed to [N, width] without a cross-lane broadcast."""
    if width == TPU_LANES:
        return x
    if width < TPU_LANES:
        return x[:, :width]
    return jnp.tile(x, (1, width // TPU_LANES))


def _tile_mask(cfg: FlashConfig, q0, k0, bq: int, bk: int, qs_ref, ks_ref):
    q_idx = q0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_idx = k0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_seg = qs_ref[...] if qs_ref is not None else None  # [bq, 1]
    k_seg = ks_ref[...] if ks_ref is not None else None  # [1, bk]
    return block_mask(cfg, q_idx, k_idx, q_seg, k_seg)


def _when(run, needs_mask, body) -> None:
    """body(masked: bool) under pl.when(run), split into a masked and an unmasked variant when needed."""
    if isinstance(needs_mask, bool):
        pl.when(run)(lambda: body(needs_mask))
        return
    pl.when(jnp.logical_and(run, needs_mask))(lambda: body(True))
    pl.when(jnp.logical_and(run, jnp.logical_not(needs_mask)))(lambda: body(False))


def _masked_scores(cfg, q2, k, mask, G, bq, bk):
    s = jax.lax.dot_general(q2, k, _NT, preferred_element_type=jnp.float32) * cfg.sm_scale  # [G*bq, bk]
    if mask is not None:
        s = jnp.where(mask[None], s.reshape(G, bq, bk), MASK).reshape(G * bq, bk)
    return s


def _split(refs, n_in: int, has_seg: bool):
    """(inputs with None for absent segment refs, rest)."""
    if has_seg:
        return refs[:n_in], refs[n_in:]
    return tuple(refs[:3]) + (None, None) + tuple(refs[3:n_in - 2]), refs[n_in - 2:]


# ---------------------------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, cfg: FlashConfig):
    ins, rest = _split(refs, 5, cfg.has_segments)
    q_ref, k_ref, v_ref, qs_ref, ks_ref = ins
    o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    G, bq, H = q_ref.shape
    bk = k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    lo, hi = kv_block_range(cfg, i, bq, bk)

    def _step(masked: bool):
        q2 = q_ref[...].reshape(G * bq, H)
        mask = _tile_mask(cfg, i * bq, j * bk, bq, bk, qs_ref, ks_ref) if masked else None
        s = _masked_scores(cfg, q2, k_ref[...], mask, G, bq, bk)
        m_prev, l_prev = m_scr[...], l_scr[...]  # [G*bq, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, bk))
        alpha = jnp.exp(m_prev - m_next)  # rescales what was accumulated under the old maximum
        l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        v = v_ref[...]
        pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * _lanes(alpha, H) + pv

    _when((j >= lo) & (j <= hi), tile_needs_mask(cfg, i * bq, bq, j * bk, bk), _step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / _lanes(l, H)).reshape(G, bq, H).astype(o_ref.dtype)
        lse_ref[...] = (m_scr[...] + jnp.log(l))[:, :1].reshape(G, bq, 1)


def _seg_specs(cfg, bq, bk, q_map, k_map):
    if not cfg.has_segments:
        return []
    return [pl.BlockSpec((None, bq, 1), q_map), pl.BlockSpec((None, 1, bk), k_map)]


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def forward(q, k, v, q_seg, kv_seg, cfg: FlashConfig):
    B, K, G, Tp, H = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = Tp // bq, cfg.padded_k // bk

    def kv_index(b, h, i, j):
        lo, hi = kv_block_range(cfg, i, bq, bk)
        return clamp_block(j, lo, hi, nk)

    q_spec = pl.BlockSpec((None, None, G, bq, H), lambda b, h, i, j: (b, h, 0, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, i, j: (b, h, kv_index(b, h, i, j), 0))
    seg_specs = _seg_specs(cfg, bq, bk, lambda b, h, i, j: (b, i, 0),
                           lambda b, h, i, j: (b, 0, kv_index(b, h, i, j)))
    lse_spec = pl.BlockSpec((None, None, G, bq, 1), lambda b, h, i, j: (b, h, 0, i, 0))
    segs = [q_seg, kv_seg] if cfg.has_segments else []
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(B, K, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
            out_specs=[q_spec, lse_spec],
            scratch_shapes=[pltpu.VMEM((G * bq, TPU_LANES), jnp.float32),
                            pltpu.VMEM((G * bq, TPU_LANES), jnp.float32),
                            pltpu.VMEM((G * bq, H), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, K, G, Tp, 1), jnp.float32)],
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="flash_attention_fwd_tpu",
    )(q, k, v, *segs)
    return o, lse


# ---------------------------------------------------------------------------------------------- dK, dV
def _dkv_kernel(*refs, cfg: FlashConfig):
    ins, rest = _split(refs, 8, cfg.has_segments)
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, di_ref = ins
    dk_ref, dv_ref, dk_scr, dv_scr = rest
    G, bq, H = q_ref.shape
    bk = k_ref.shape[0]
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    lo, hi = q_block_range(cfg, j, bq, bk)

    def _step(masked: bool):
        q2 = q_ref[...].reshape(G * bq, H)
        do2 = do_ref[...].reshape(G * bq, H)
        k, v = k_ref[...], v_ref[...]
        mask = _tile_mask(cfg, i * bq, j * bk, bq, bk, qs_ref, ks_ref) if masked else None
        s = _masked_scores(cfg, q2, k, mask, G, bq, bk)
        p = jnp.exp(s - lse_ref[...].reshape(G * bq, 1))  # probabilities from the saved logsumexp
        if mask is not None:  # rows whose keys are all masked (padding) have lse ~ MASK: keep them out
            p = jnp.where(mask[None], p.reshape(G, bq, bk), 0.0).reshape(G * bq, bk)
        dv_scr[...] += jax.lax.dot(p.T.astype(do2.dtype), do2, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do2, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[...].reshape(G * bq, 1)) * cfg.sm_scale
        dk_scr[...] += jax.lax.dot(ds.T.astype(q2.dtype), q2, preferred_element_type=jnp.float32)

    _when((i >= lo) & (i <= hi), tile_needs_mask(cfg, i * bq, bq, j * bk, bk), _step)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_dkv(q, k, v, q_seg, kv_seg, do, lse, di, cfg: FlashConfig):
    B, K, G, Tp, H = q.shape
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    nq, nk = Tp // bq, cfg.padded_k // bk

    def q_index(b, h, j, i):
        lo, hi = q_block_range(cfg, j, bq, bk)
        return clamp_block(i, lo, hi, nq)

    q_spec = pl.BlockSpec((None, None, G, bq, H), lambda b, h, j, i: (b, h, 0, q_index(b, h, j, i), 0))
    row_spec = pl.BlockSpec((None, None, G, bq, 1), lambda b, h, j, i: (b, h, 0, q_index(b, h, j, i), 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, j, i: (b, h, j, 0))
    seg_specs = _seg_specs(cfg, bq, bk, lambda b, h, j, i: (b, q_index(b, h, j, i), 0),
                           lambda b, h, j, i: (b, 0, j))
    segs = [q_seg, kv_seg] if cfg.has_segments else []
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(B, K, nk, nq),
            in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, q_spec, row_spec, row_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="flash_attention_dkv_tpu",
    )(q, k, v, *segs, do, lse, di)
    return dk, dv


# ---------------------------------------------------------------------------------------------- dQ
def _dq_kernel(*refs, cfg: FlashConfig):
    ins, rest = _split(refs, 8, cfg.has_segments)
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, di_ref = ins
    dq_ref, dq_scr = rest
    G, bq, H = q_ref.shape
    bk = k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    lo, hi = kv_block_range(cfg, i, bq, bk)

    def _step(masked: bool):
        q2 = q_ref[...].reshape(G * bq, H)
        do2 = do_ref[...].reshape(G * bq, H)
        k, v = k_ref[...], v_ref[...]
        mask = _tile_mask(cfg, i * bq, j * bk, bq, bk, qs_ref, ks_ref) if masked else None
        s = _masked_scores(cfg, q2, k, mask, G, bq, bk)
        p = jnp.exp(s - lse_ref[...].reshape(G * bq, 1))
        if mask is not None:
            p = jnp.where(mask[None], p.reshape(G, bq, bk), 0.0).reshape(G * bq, bk)
        dp = jax.lax.dot_general(do2, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[...].reshape(G * bq, 1)) * cfg.sm_scale
        dq_scr[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _when((j >= lo) & (j <= hi), tile_needs_mask(cfg, i * bq, bq, j * bk, bk), _step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].reshape(G, bq, H).astype(dq_ref.dtype)


def backward_dq(q, k, v, q_seg, kv_seg, do, lse, di, cfg: FlashConfig):
    B, K, G, Tp, H = q.shape
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    nq, nk = Tp // bq, cfg.padded_k // bk

    def kv_index(b, h, i, j):
        lo, hi = kv_block_range(cfg, i, bq, bk)
        return clamp_block(j, lo, hi, nk)

    q_spec = pl.BlockSpec((None, None, G, bq, H), lambda b, h, i, j: (b, h, 0, i, 0))
    row_spec = pl.BlockSpec((None, None, G, bq, 1), lambda b, h, i, j: (b, h, 0, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, i, j: (b, h, kv_index(b, h, i, j), 0))
    seg_specs = _seg_specs(cfg, bq, bk, lambda b, h, i, j: (b, i, 0),
                           lambda b, h, i, j: (b, 0, kv_index(b, h, i, j)))
    segs = [q_seg, kv_seg] if cfg.has_segments else []
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(B, K, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, q_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((G * bq, H), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="flash_attention_dq_tpu",
    )(q, k, v, *segs, do, lse, di)
