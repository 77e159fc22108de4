"""The int4 matmul kernels (format and public API in int4_matmul.py).

TPU: grid (M/bm, Dout/bn, Din/bk) with the Din axis sequential and an fp32 VMEM accumulator.
GPU: grid (M/bm, Dout/bn, splits); each program loops over its share of Din in block_k steps and writes an
fp32 partial, the partials are summed by XLA (split-K keeps the SMs busy when M is a handful of rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas._common import pad_axis, round_up


def _dequant(nib, scales, zeros, g: int, dtype):
    """nibbles [n*g/2, bn] (int32) of n groups -> (nibble - zero) * scale as [n*g/2, bn] in `dtype`."""
    rows, bn = nib.shape
    n = scales.shape[0]
    zero = 8.0 if zeros is None else zeros.astype(jnp.float32)[:, None, :]
    w = (nib.astype(jnp.float32).reshape(n, g // 2, bn) - zero) * scales.astype(jnp.float32)[:, None, :]
    return w.reshape(rows, bn).astype(dtype)


def _tile_product(x_lo, x_hi, packed, scales, zeros, g):
    p = packed.astype(jnp.int32)
    lo = _dequant(p & 0xF, scales, zeros, g, x_lo.dtype)
    hi = _dequant(p >> 4, scales, zeros, g, x_lo.dtype)
    return (lax.dot(x_lo, lo, preferred_element_type=jnp.float32)
            + lax.dot(x_hi, hi, preferred_element_type=jnp.float32))


def _tpu_kernel(xl_ref, xh_ref, p_ref, s_ref, *refs, g: int, has_zeros: bool):
    if has_zeros:
        z_ref, o_ref, acc_ref = refs
    else:
        (o_ref, acc_ref), z_ref = refs, None
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    acc_ref[...] += _tile_product(xl_ref[...], xh_ref[...], p_ref[...], s_ref[...],
                                  None if z_ref is None else z_ref[...], g)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tpu_int4_matmul(x_lo, x_hi, packed, scales, zeros, g, bs, interpret):
    m, half = x_lo.shape
    dout = packed.shape[1]
    bm, bn, bk = min(bs.block_m, round_up(m, 16)), bs.block_n, bs.block_k
    mp = round_up(m, bm)
    x_lo, x_hi = pad_axis(x_lo, 0, mp), pad_axis(x_hi, 0, mp)
    x_spec = pl.BlockSpec((bm, bk // 2), lambda i, j, kk: (i, kk))
    w_spec = pl.BlockSpec((bk // 2, bn), lambda i, j, kk: (kk, j))
    s_spec = pl.BlockSpec((bk // g, bn), lambda i, j, kk: (kk, j))
    extra = [] if zeros is None else [zeros]
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, g=g, has_zeros=zeros is not None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(mp // bm, dout // bn, (2 * half) // bk),
            in_specs=[x_spec, x_spec, w_spec, s_spec] + [s_spec] * len(extra),
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((mp, dout), x_lo.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="int4_matmul_tpu",
    )(x_lo, x_hi, packed, scales, *extra)
    return out[:m]


def _gpu_kernel(xl_ref, xh_ref, p_ref, s_ref, *refs, g: int, bk: int, k_per_split: int, has_zeros: bool):
    if has_zeros:
        z_ref, o_ref = refs
    else:
        (o_ref,), z_ref = refs, None
    bm, bn = o_ref.shape
    split = pl.program_id(2)
    ngb = bk // g

    def body(kk, acc):
        rows, groups = pl.ds(kk * (bk // 2), bk // 2), pl.ds(kk * ngb, ngb)
        z = None if z_ref is None else z_ref[groups, :]
        return acc + _tile_product(xl_ref[:, rows], xh_ref[:, rows], p_ref[rows, :], s_ref[groups, :], z, g)

    first = split * k_per_split
    o_ref[...] = lax.fori_loop(first, first + k_per_split, body, jnp.zeros((bm, bn), jnp.float32))


def gpu_int4_matmul(x_lo, x_hi, packed, scales, zeros, g, bs, interpret):
    m, half = x_lo.shape
    dout = packed.shape[1]
    bm, bn, bk, splits = bs.block_m, bs.block_n, bs.block_k, bs.splits
    mp, np_ = round_up(m, bm), round_up(dout, bn)
    x_lo, x_hi = pad_axis(x_lo, 0, mp), pad_axis(x_hi, 0, mp)
    if np_ != dout:  # only odd widths pay for this copy
        packed, scales = pad_axis(packed, 1, np_), pad_axis(scales, 1, np_, 1)
        zeros = None if zeros is None else pad_axis(zeros, 1, np_)
    ng = scales.shape[0]
    n_k = (2 * half) // bk
    x_spec = pl.BlockSpec((bm, half), lambda i, j, s: (i, 0))
    s_spec = pl.BlockSpec((ng, bn), lambda i, j, s: (0, j))
    extra = [] if zeros is None else [zeros]
    parts = pl.pallas_call(
        functools.partial(_gpu_kernel, g=g, bk=bk, k_per_split=n_k // splits, has_zeros=zeros is not None),
        grid=(mp // bm, np_ // bn, splits),
        in_specs=[x_spec, x_spec, pl.BlockSpec((half, bn), lambda i, j, s: (0, j)), s_spec]
        + [s_spec] * len(extra),
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, np_), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="int4_matmul_gpu",
    )(x_lo, x_hi, packed, scales, *extra)
    return jnp.sum(parts, axis=0)[:m, :dout]
