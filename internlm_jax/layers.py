"""Building blocks of the InternLM2 decoder: RMSNorm, rotary embeddings, the weight-type-dispatching linear,
and the reference (pure-JAX) grouped-query attention.

Dimension letters: B batch, T query length, S key length, D model width, F MLP width, N query heads,
K kv heads, G query heads per kv head, H head dim, L layers, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from internlm_jax.config import ModelConfig

# Large negative instead of -inf: a query row with every key masked (padding) gives a uniform, finite
# softmax instead of NaN, and exp() of it underflows to exactly 0 next to any unmasked score.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, "D"], eps: float) -> Float[Array, "... D"]:
    """InternLM2 RMSNorm: statistics in fp32, cast back to the input dtype, then scale by the weight."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * y


def rope_base(config: ModelConfig, seq_len: Int[Array, "..."] | int) -> Float[Array, "..."]:
    """Rotary base for a key length (any shape), with dynamic NTK scaling once it exceeds
    max_position_embeddings M: base = theta * ((f * S / M) - (f - 1)) ** (H / (H - 2)) when S > M, else
    theta. Like the official code, S is the length the rotation is computed for (see `rope_tables`);
    keys already in a cache keep the rotation they were written with."""
    theta = jnp.float32(config.rope_theta)
    if config.rope_scaling is None or config.rope_scaling[0] != "dynamic":
        return jnp.broadcast_to(theta, jnp.shape(seq_len))
    _, factor = config.rope_scaling
    m = config.max_position_embeddings
    h = config.head_dim
    s = jnp.asarray(seq_len, jnp.float32)
    scaled = theta * ((factor * s / m) - (factor - 1.0)) ** (h / (h - 2.0))
    return jnp.where(s > m, scaled, theta)


def rope_tables(config: ModelConfig, positions: Int[Array, "B T"], rope_len: Int[Array, "B"] | None = None
                ) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
    """cos and sin for the non-interleaved (rotate_half) convention of the HF weights, in fp32.

    Dynamic NTK, as the official code computes it: a forward call rotates its tokens with the base of
    S = max(position) + 1 of the call, i.e. the sequence's total length so far. Per token here, S =
    max(rope_len[b], position + 1): `rope_len` is each row's length the rotation must cover (default: the
    row's own max position + 1, so padding never enlarges it). A chunked prefill passes the whole prompt's
    length, so every chunk is rotated as the one-call prefill would be; a decode token at position p then
    gets max(prompt, p + 1) = p + 1, the official rule. Linear scaling divides positions by the factor.
    """
    h = config.head_dim
    pos = jnp.maximum(positions, 0).astype(jnp.float32)
    exponents = jnp.arange(0, h, 2, dtype=jnp.float32) / h  # [H/2]
    scaling = config.rope_scaling
    if scaling is not None and scaling[0] == "dynamic":
        if rope_len is None:
            rope_len = jnp.max(positions, axis=1) + 1
        seq_len = jnp.maximum(rope_len[:, None], positions + 1)  # [B, T]
        inv_freq = 1.0 / (rope_base(config, seq_len)[..., None] ** exponents)  # [B, T, H/2]
    else:
        if scaling is not None and scaling[0] == "linear":
            pos = pos / jnp.float32(scaling[1])
        inv_freq = 1.0 / (jnp.float32(config.rope_theta) ** exponents)
    angles = pos[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B T *heads H"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]
               ) -> Float[Array, "B T *heads H"]:
    """x * cos + rotate_half(x) * sin, in fp32, cast back."""
    extra = x.ndim - 3
    shape = cos.shape[:2] + (1,) * extra + cos.shape[2:]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def linear(x: Array, w: object, in_axes: str, out_axes: str, dtype: jnp.dtype) -> Array:
    """x[..., in] @ w[in, out] for any weight type.

    A plain array is an einsum. Any other weight object (a LoRA-wrapped weight, an int4 quantized weight)
    carries its own `linear(x, in_axes, out_axes, dtype)`, so callers never branch on the weight type.
    `in_axes`/`out_axes` are dimension letters, e.g. linear(x, wqkv, "D", "KQH") for x[B, T, D].
    """
    if hasattr(w, "linear"):
        return w.linear(x, in_axes, out_axes, dtype)  # type: ignore[attr-defined]
    lead = "ZYXW"[: x.ndim - len(in_axes)]
    return jnp.einsum(f"{lead}{in_axes},{in_axes}{out_axes}->{lead}{out_axes}", x.astype(dtype), w.astype(dtype))


def attention_mask(q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"],
                   q_seg: Int[Array, "B T"] | None, k_seg: Int[Array, "B S"] | None,
                   by_position: bool) -> jax.Array:
    """[B, T, S] bool: causal (by index when keys are the queries, by position with a cache) and same segment.

    With a cache, key slots never written hold position -1 and are masked.
    """
    if by_position:
        mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
    else:
        t, s = q_pos.shape[1], k_pos.shape[1]
        mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None]
    if q_seg is not None and k_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask


def reference_attention(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
                        mask: jax.Array) -> Float[Array, "B T K G H"]:
    """softmax(q k^T / sqrt(H)) v with fp32 scores and softmax; GQA without repeating K/V."""
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
