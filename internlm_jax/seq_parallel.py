"""Sequence (context) parallel attention for long sequences: all-gather K/V over the `sequence` mesh axis,
blockwise online softmax over the gathered keys, and zigzag causal load balancing.

Each device holds T/n query tokens. K and V (with their positions and segment ids) are all-gathered, which for
GQA is cheap (K kv heads instead of N query heads). Scores are computed one key block at a time with a running
max and sum (fp32), so memory stays O(T/n x block) instead of O(T/n x T).

Causality uses positions and segment ids, not array order, so the sequence can be permuted: `zigzag_order`
splits it into 2n chunks and gives device i chunks i and 2n-1-i, so every device gets the same amount of causal
work (the last device would otherwise do n times more than the first). Positions restart per packed document, so
"same segment and key position <= query position" is exactly the causal block-diagonal mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int

from internlm_jax.layers import MASK_VALUE


def zigzag_order(length: int, n: int) -> np.ndarray:
    """Permutation of [0, length) giving device i the chunks i and 2n-1-i (length % 2n == 0)."""
    if length % (2 * n):
        raise ValueError(f"sequence length {length} must be a multiple of 2 x sequence-parallel size ({2 * n})")
    chunks = np.arange(length).reshape(2 * n, length // (2 * n))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def _blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, block: int):
    """Online-softmax attention over key blocks. q [B,T,K,G,H]; k,v [B,S,K,H]; returns [B,T,K,G,H]."""
    b, t, kh, g, h = q.shape
    s = k.shape[1]
    nb = -(-s // block)
    pad = nb * block - s
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=np.iinfo(np.int32).max)
        k_seg = jnp.pad(k_seg, ((0, 0), (0, pad)), constant_values=-1)
    kb = k.reshape(b, nb, block, kh, h).swapaxes(0, 1)
    vb = v.reshape(b, nb, block, kh, h).swapaxes(0, 1)
    pb = k_pos.reshape(b, nb, block).swapaxes(0, 1)
    sb = k_seg.reshape(b, nb, block).swapaxes(0, 1)
    scale = h ** -0.5

    def step(carry, xs):
        m, l, acc = carry  # [B,K,G,T], [B,K,G,T], [B,T,K,G,H] (fp32)
        kc, vc, pc, sc = xs
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, kc, preferred_element_type=jnp.float32) * scale
        mask = (pc[:, None, :] <= q_pos[:, :, None]) & (sc[:, None, :] == q_seg[:, :, None])  # [B,T,S]
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[..., None])
        l_new = l * corr + p.sum(-1)
        pv = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
        acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
        return (m_new, l_new, acc), None

    init = (jnp.full((b, kh, g, t), MASK_VALUE, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, t, kh, g, h), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, pb, sb))
    return (acc / jnp.moveaxis(l, -1, 1)[..., None]).astype(q.dtype)


def sequence_parallel_attention(q: Float[Array, "B T K G H"], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
                                positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None, *, mesh: Mesh,
                                axis: str = "sequence", batch_axes: tuple[str, ...] = ("data", "fsdp"),
                                head_axis: str | None = "tensor", block: int = 512) -> Float[Array, "B T K G H"]:
    """Causal, segment-aware attention with the sequence sharded over `axis` (any token order)."""
    if segment_ids is None:
        segment_ids = jnp.ones(positions.shape, jnp.int32)
    bx = tuple(a for a in batch_axes if a in mesh.shape and q.shape[0] % mesh.shape[a] == 0) or None
    hx = head_axis if head_axis in mesh.shape and q.shape[2] % mesh.shape[head_axis] == 0 else None
    qspec = PartitionSpec(bx, axis, hx, None, None)
    kspec = PartitionSpec(bx, axis, hx, None)
    tspec = PartitionSpec(bx, axis)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(qspec, kspec, kspec, tspec, tspec), out_specs=qspec,
                       check_vma=False)
    def inner(q, k, v, pos, seg):
        k_all = jax.lax.all_gather(k, axis, axis=1, tiled=True)
        v_all = jax.lax.all_gather(v, axis, axis=1, tiled=True)
        pos_all = jax.lax.all_gather(pos, axis, axis=1, tiled=True)
        seg_all = jax.lax.all_gather(seg, axis, axis=1, tiled=True)
        return _blockwise_attention(q, k_all, v_all, pos, pos_all, seg, seg_all, block)

    return inner(q, k, v, positions.astype(jnp.int32), segment_ids.astype(jnp.int32))
