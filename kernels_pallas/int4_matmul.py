"""Weight-only int4 matmul (y = x @ W, activations bf16/fp32, W packed int4), for TPU and GPU, with a pure-JAX
reference. This module defines the project's int4 weight format.

## The packed int4 format (Int4Weight)
W is [Din, Dout] (already transposed for y = x @ W). Rows are quantised in groups of `group_size` (g = 64 or
128) consecutive rows along Din, separately for every output column:
- symmetric:  s = max|w| / 7;  q = clip(round(w / s), -7, 7);  nibble = q + 8;     w ~ (nibble - 8) * s
- asymmetric: range [min(w, 0), max(w, 0)], s = range / 15, z = clip(round(-min / s), 0, 15),
              nibble = clip(round(w / s) + z, 0, 15);                               w ~ (nibble - z) * s
(a group that is all zero gets s = 1). `scales` [Din/g, Dout] (float32 or bfloat16), `zeros` [Din/g, Dout]
float32 holding integers 0..15 (None when symmetric).
`packed` [Din/2, Dout] uint8 holds two nibbles per byte. Inside each group the byte for group row i
(0 <= i < g/2) holds row i in its low nibble and row i + g/2 in its high nibble ("half-split" packing): a
kernel unpacks a tile with one `& 0xF` and one `>> 4` into two contiguous row ranges, never interleaving.
Why uint8 and not jnp.int4: packed bytes lower identically through Mosaic, Triton and the interpreter, the
layout is explicit (it maps onto AWQ/GPTQ-style checkpoints) and no sub-byte array layout support is needed;
jnp.int4 arrays would be padded differently by each backend.

## Kernels
Both compute acc += x_lo @ deq(lo nibbles) + x_hi @ deq(hi nibbles) in fp32, where x_lo / x_hi are the
columns of x matching the low / high half of each group (a cheap permutation of x done once per call), and
dequantisation ((nibble - zero) * scale, cast to x's dtype) happens on the tile in VMEM / registers, so HBM
traffic is the packed bytes plus scales. Decode shape (few rows): one row block, so every weight byte is read
once; prefill shape: row blocks of block_m.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels_pallas import _int4_kernels
from kernels_pallas._common import check_dtype, next_pow2, resolve_backend, resolve_interpret, round_up


@flax.struct.dataclass
class Int4Weight:
    """A packed int4 weight for y = x @ W (see the module docstring). Leaves may carry leading stacking axes
    (e.g. a layer axis); the static fields always describe one [Din, Dout] matrix."""

    packed: jax.Array  # uint8 [Din/2, Dout]
    scales: jax.Array  # [Din/g, Dout]
    zeros: jax.Array | None  # float32 [Din/g, Dout] or None (symmetric)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    in_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # logical input dims
    out_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # logical output dims

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.in_shape), math.prod(self.out_shape)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def linear(self, x: Array, in_axes: str, out_axes: str, dtype: Any) -> Array:
        """layers.linear hook: x[..., *in_shape] -> [..., *out_shape]; the kernel on TPU/GPU, else the reference."""
        if len(in_axes) != len(self.in_shape) or len(out_axes) != len(self.out_shape):
            raise ValueError(f"Int4Weight of in_shape {self.in_shape}, out_shape {self.out_shape} used as "
                             f"{in_axes}->{out_axes}")
        lead = x.shape[: x.ndim - len(self.in_shape)]
        x2 = x.reshape(-1, self.shape[0]).astype(dtype)
        on_device = jax.default_backend() in ("tpu", "gpu", "cuda")
        y = int4_matmul(x2, self) if on_device else int4_matmul_reference(x2, self)
        return y.reshape(*lead, *self.out_shape)


def quantize_int4(w: Float[Array, "Din Dout"], group_size: int = 128, symmetric: bool = True, *,
                  in_ndim: int = 1, scale_dtype: Any = jnp.float32) -> Int4Weight:
    """Round-to-nearest int4 quantisation of w [*in_dims, *out_dims] (in_ndim leading dims are the input)."""
    if group_size not in (32, 64, 128, 256):
        raise ValueError(f"group_size must be 64 or 128 (32/256 also accepted), got {group_size}")
    if w.ndim < 2 or not 1 <= in_ndim < w.ndim:
        raise ValueError(f"w must have >= 2 dims with 1 <= in_ndim < w.ndim, got shape {w.shape}, in_ndim={in_ndim}")
    in_shape, out_shape = tuple(w.shape[:in_ndim]), tuple(w.shape[in_ndim:])
    din, dout = math.prod(in_shape), math.prod(out_shape)
    if din % group_size:
        raise ValueError(f"input dim {din} is not a multiple of group_size {group_size}")
    g = group_size
    wg = w.reshape(din // g, g, dout).astype(jnp.float32)
    if symmetric:
        s = jnp.max(jnp.abs(wg), axis=1) / 7.0
        s = jnp.where(s == 0, 1.0, s).astype(scale_dtype)
        q = jnp.clip(jnp.round(wg / s.astype(jnp.float32)[:, None]), -7, 7) + 8
        zeros = None
    else:
        lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)
        hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)
        s = (hi - lo) / 15.0
        s = jnp.where(s == 0, 1.0, s).astype(scale_dtype)
        s32 = s.astype(jnp.float32)
        zeros = jnp.clip(jnp.round(-lo / s32), 0, 15)
        q = jnp.clip(jnp.round(wg / s32[:, None]) + zeros[:, None], 0, 15)
    q = q.astype(jnp.uint8)  # [Din/g, g, Dout], values 0..15
    packed = q[:, : g // 2] | (q[:, g // 2:] << 4)  # half-split: row i low nibble, row i + g/2 high nibble
    return Int4Weight(packed=packed.reshape(din // 2, dout), scales=s, zeros=zeros, group_size=g,
                      in_shape=in_shape, out_shape=out_shape)


def unpack_nibbles(packed: jax.Array, group_size: int) -> jax.Array:
    """uint8 [Din/2, Dout] -> float32 nibble values [Din, Dout] in row order."""
    half, dout = packed.shape[-2:]
    g2 = group_size // 2
    p = packed.reshape(*packed.shape[:-2], half // g2, g2, dout)
    both = jnp.concatenate([p & 0xF, p >> 4], axis=-2)  # [..., Din/g, g, Dout]
    return both.reshape(*packed.shape[:-2], 2 * half, dout).astype(jnp.float32)


def dequantize_int4(w: Int4Weight, dtype: Any = jnp.float32) -> Array:
    """The [*in_shape, *out_shape] weight the packed values stand for, in `dtype`."""
    din, dout = w.shape
    g = w.group_size
    nib = unpack_nibbles(w.packed, g).reshape(din // g, g, dout)
    zero = 8.0 if w.zeros is None else w.zeros[:, None]
    deq = (nib - zero) * w.scales.astype(jnp.float32)[:, None]
    return deq.reshape(*w.in_shape, *w.out_shape).astype(dtype)


def _validate(x, w: Int4Weight):
    if not isinstance(w, Int4Weight):
        raise TypeError(f"w must be an Int4Weight (see quantize_int4), got {type(w).__name__}")
    din, dout = w.shape
    if x.ndim != 2 or x.shape[1] != din:
        raise ValueError(f"x must be [M, Din={din}], got {x.shape}")
    check_dtype("x", x, ("float32", "bfloat16", "float16"))
    if w.packed.shape != (din // 2, dout) or w.packed.dtype != jnp.uint8:
        raise ValueError(f"packed must be uint8 [{din // 2}, {dout}], got {w.packed.dtype} {w.packed.shape}; "
                         "stacked weights must be sliced (or scanned) to one matrix first")
    ng = din // w.group_size
    if w.scales.shape != (ng, dout) or (w.zeros is not None and w.zeros.shape != (ng, dout)):
        raise ValueError(f"scales/zeros must be [{ng}, {dout}], got {w.scales.shape} / "
                         f"{None if w.zeros is None else w.zeros.shape}")


@jax.jit
def int4_matmul_reference(x: Float[Array, "M Din"], w: Int4Weight) -> Float[Array, "M Dout"]:
    """x @ dequantize(W): weights dequantised in fp32, cast to x's dtype, fp32 accumulation (as the kernels)."""
    _validate(x, w)
    wd = dequantize_int4(w, jnp.float32).reshape(w.shape).astype(x.dtype)
    return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_m rows of x, block_n output columns, block_k input rows per step (a multiple of group_size).

    TPU: block_k/2 a multiple of 128 and block_k/g of 8 (or block_k = Din); block_n a multiple of 128 (or Dout).
    GPU: powers of two, block_m >= 16, block_k/2 >= 16. `splits` cuts Din into ranges summed afterwards (GPU).
    """

    block_m: int
    block_n: int
    block_k: int
    splits: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}")


def _largest_divisor(n: int, candidates: tuple[int, ...], fallback: int) -> int:
    return next((c for c in candidates if c <= n and n % c == 0), fallback)


def default_block_sizes(backend: str, m: int, din: int, dout: int, group_size: int) -> BlockSizes:
    """Decode (m <= 64): one row block, large K tiles; prefill: 256-row blocks."""
    g = group_size
    if backend == "tpu":
        bm = round_up(m, 16) if m <= 256 else 256
        bn = _largest_divisor(dout, (512, 256, 128), dout)
        bk = _largest_divisor(din, tuple(c for c in (4096, 2048, 1024) if c % (8 * g) == 0), din)
        return BlockSizes(bm, bn, bk)
    bm = max(16, next_pow2(m)) if m <= 64 else 64
    bn = _largest_divisor(dout, (128, 64, 32, 16), 16)
    bk = g
    n_tiles = -(-dout // bn) * -(-m // bm)
    splits = max(1, min(din // bk, -(-264 // n_tiles))) if m <= 64 else 1
    while (din // bk) % splits:
        splits -= 1
    return BlockSizes(bm, bn, bk, splits)


@functools.partial(jax.jit, static_argnames=("block_sizes", "backend", "interpret"))
def int4_matmul(x: Float[Array, "M Din"], w: Int4Weight, *, block_sizes: BlockSizes | None = None,
                backend: str = "auto", interpret: bool | None = None) -> Float[Array, "M Dout"]:
    """y = x @ W for a packed int4 W, in x's dtype (fp32 accumulation)."""
    _validate(x, w)
    be = resolve_backend(backend)
    interp = resolve_interpret(interpret, be)
    m, din = x.shape
    dout = w.shape[1]
    g = w.group_size
    bs = block_sizes or default_block_sizes(be, m, din, dout, g)
    _check_blocks(bs, be, m, din, dout, g)
    # Columns of x that meet the low / high nibbles (see "half-split" packing): [M, Din/2] each.
    xg = x.reshape(m, din // g, 2, g // 2)
    x_lo, x_hi = xg[:, :, 0].reshape(m, din // 2), xg[:, :, 1].reshape(m, din // 2)
    impl = _int4_kernels.tpu_int4_matmul if be == "tpu" else _int4_kernels.gpu_int4_matmul
    return impl(x_lo, x_hi, w.packed, w.scales, w.zeros, g, bs, interp).astype(x.dtype)


def _check_blocks(bs: BlockSizes, backend: str, m: int, din: int, dout: int, g: int) -> None:
    if bs.block_k % g or din % bs.block_k:
        raise ValueError(f"block_k={bs.block_k} must be a multiple of group_size={g} and divide Din={din}")
    if (din // bs.block_k) % bs.splits:
        raise ValueError(f"splits={bs.splits} must divide the {din // bs.block_k} K blocks")
    if backend == "tpu":
        if bs.block_k != din and (bs.block_k // 2 % 128 or bs.block_k // g % 8):
            raise ValueError(f"TPU block_k={bs.block_k}: need block_k/2 % 128 == 0 and block_k/group % 8 == 0, "
                             f"or block_k == Din ({din})")
        if dout % bs.block_n or (bs.block_n != dout and bs.block_n % 128):
            raise ValueError(f"TPU block_n={bs.block_n} must divide Dout={dout} and be a multiple of 128 (or Dout)")
        if bs.block_m % 16 and bs.block_m < m:
            raise ValueError(f"TPU block_m={bs.block_m} must be a multiple of 16")
        if bs.splits != 1:
            raise ValueError("splits is a GPU option; the TPU kernel reduces over Din on its sequential grid axis")
    else:
        for name, v, lo in (("block_m", bs.block_m, 16), ("block_n", bs.block_n, 16), ("block_k", bs.block_k, 32)):
            if v < lo or v & (v - 1):
                raise ValueError(f"GPU {name}={v} must be a power of two >= {lo}")
