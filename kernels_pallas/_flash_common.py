"""What the TPU and GPU flash-attention kernels share: the static config, masks and causal/window block ranges.

Index conventions (padded layouts): query row i (0 <= i < Tp) sits at absolute key index i + offset, with
offset = S - T (queries are the last T positions of the keys; 0 for self-attention). Key j is real when
j < kv_len (= S); padded keys are always masked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas._common import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Everything static about one flash-attention call (hashable: a nondiff argument of the custom_vjp)."""

    backend: str
    interpret: bool
    causal: bool
    sm_scale: float
    window: int | None  # sliding window: key j visible from absolute query index a iff a - j < window
    offset: int  # S - T
    kv_len: int  # real S
    q_len: int  # real T
    groups: int  # G
    has_segments: bool
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    padded_q: int  # Tp
    padded_k: int  # Sp
    num_warps: int = 4
    num_stages: int = 2

    @property
    def kv_padded(self) -> bool:
        return self.padded_k != self.kv_len


def block_mask(cfg: FlashConfig, q_idx: jax.Array, k_idx: jax.Array,
               q_seg: jax.Array | None, k_seg: jax.Array | None) -> jax.Array | None:
    """Boolean visibility for one tile, or None when every pair is visible.

    q_idx / k_idx are row / column index arrays that broadcast to the tile ([bq, 1]-like and [1, bk]-like,
    or full tiles); q_seg / k_seg likewise when the call has segment ids.
    """
    mask = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    q_abs = q_idx + cfg.offset
    if cfg.kv_padded:
        mask = both(mask, k_idx < cfg.kv_len)
    if cfg.causal:
        mask = both(mask, k_idx <= q_abs)
    if cfg.window is not None:
        mask = both(mask, q_abs - k_idx < cfg.window)
    if q_seg is not None and k_seg is not None:
        mask = both(mask, q_seg == k_seg)
    return mask


def tile_needs_mask(cfg: FlashConfig, q_first, bq: int, k_first, bk: int):
    """Whether some pair of the tile (rows q_first.., keys k_first..) may be masked: True/False when known
    statically, else a traced bool. Tiles strictly inside the visible band skip the iota/compare/select work."""
    if cfg.has_segments:
        return True
    conds = []
    if cfg.kv_padded:
        conds.append(k_first + bk > cfg.kv_len)
    if cfg.causal:
        conds.append(k_first + bk - 1 > q_first + cfg.offset)
    if cfg.window is not None:
        conds.append(q_first + bq - 1 + cfg.offset - k_first >= cfg.window)
    if not conds:
        return False
    out = conds[0]
    for c in conds[1:]:
        out = jnp.logical_or(out, c)
    return out


def _div(x, d: int):
    """floor(x / d) for traced int32 x that may be negative (lax.div truncates toward zero)."""
    x = jnp.asarray(x, jnp.int32)
    return jnp.where(x >= 0, lax.div(x, d), -lax.div(-x + d - 1, d))


def kv_block_range(cfg: FlashConfig, i, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """[lo, hi] (inclusive) of the key blocks that query block i needs; lo > hi never happens for real rows."""
    nk = cfg.padded_k // bk
    last_real = (cfg.kv_len - 1) // bk
    hi = jnp.int32(min(nk - 1, last_real))
    lo = jnp.int32(0)
    if cfg.causal:
        hi = jnp.minimum(hi, _div(i * bq + bq - 1 + cfg.offset, bk))
    if cfg.window is not None:
        lo = jnp.maximum(lo, _div(i * bq + cfg.offset - cfg.window + 1, bk))
    return lo, hi


def q_block_range(cfg: FlashConfig, j, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """[lo, hi] (inclusive) of the query blocks that see any key of key block j; may be empty (lo > hi)."""
    nq = cfg.padded_q // bq
    lo = jnp.int32(0)
    hi = jnp.int32(nq - 1)
    if cfg.causal:  # rows with i + offset >= j * bk
        lo = jnp.maximum(lo, _div(j * bk - cfg.offset, bq))
    if cfg.window is not None:  # rows with i + offset - (j * bk + bk - 1) < window
        hi = jnp.minimum(hi, _div(j * bk + bk - 2 + cfg.window - cfg.offset, bq))
    return lo, hi


def clamp_block(idx, lo, hi, n: int):
    """A block index inside [lo, hi] and [0, n): grid steps outside the range re-use a fetched block."""
    return jnp.clip(jnp.minimum(jnp.maximum(idx, lo), hi), 0, n - 1)


MASK = MASK_VALUE
