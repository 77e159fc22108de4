"""Token sampling shared by `LM.generate`: greedy, temperature, top-k, top-p, all traced (no recompiles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def filter_logits(logits: Float[Array, "B V"], temperature: Float[Array, "B"], top_k: Int[Array, "B"],
                  top_p: Float[Array, "B"]) -> Float[Array, "B V"]:
    """Scaled and masked logits: top_k <= 0 and top_p >= 1 disable those filters."""
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    v = logits.shape[-1]
    k = jnp.where(top_k <= 0, v, jnp.minimum(top_k, v))
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p (always keep the top token).
    probs = jax.nn.softmax(jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample(logits: Float[Array, "B V"], key: jax.Array, temperature: Float[Array, "B"], top_k: Int[Array, "B"],
           top_p: Float[Array, "B"]) -> Int[Array, "B"]:
    """One token per row; rows with temperature == 0 are greedy."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    sampled = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(temperature <= 0, greedy, sampled)
