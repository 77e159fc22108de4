"""The fused output head + cross-entropy: no [B, T, V] logits, the weight gradient as one matmul per chunk.

Every training loss that ends in the vocabulary (pre-training and SFT next-token loss, DPO's per-token
log-probs) goes through this module. The hidden states h [B, T, D] (final norm applied) and the head weight
w [D, V] enter; only [B, c, V] logits of one length chunk exist at a time, in fp32.

Two entry points, both with a custom VJP:

- `head_ce_sums(h, w, targets, weights, z_loss)` -> (objective, ce_sum, z_sum), where
      ce_sum = sum weights * ce,  z_sum = sum weights * lse^2,  objective = ce_sum + z_loss * z_sum.
  The loss is the end of the graph, so the gradient of `objective` is formed in the forward pass itself:
  each chunk's logits are computed once, turned into dlogits = w_t * ((1 + 2 z lse) softmax - onehot) while
  they are hot, and contracted at once into dh [B, c, D] and into dw [D, V] (one matmul, accumulated in fp32,
  already in the weight's layout). The backward pass only scales those by the incoming cotangent: three
  vocabulary matmuls per step instead of four (no recomputation of the logits) and no transpose of a
  [T, V] array. Only `objective` carries a gradient: ce_sum and z_sum are returned through stop_gradient
  (they are the metrics; the optimiser differentiates the objective).
- `head_token_ce(h, w, targets)` -> (ce, lse), each [B, T]: per-token values for losses that combine them
  non-linearly (DPO pairs, RL advantages). Its backward recomputes one chunk's logits at a time from h and w
  and the saved lse, and forms dh and dw the same way, for any cotangents of ce and lse.

Both chunk the length axis (the batch axis stays whole, so a batch sharded over devices stays sharded; the
logits carry the `act_vocab` name, so a vocabulary sharded over `tensor` stays sharded too). A chunk that
does not divide T pads the last chunk with zero-weight positions. Matmul inputs are cast to the compute dtype
with fp32 accumulation; softmax, lse and all sums are fp32.

`reference_ce_sums` / `reference_token_ce` beside them are the plain path (full logits -> log_softmax ->
masked sums) the tests compare against. `head_weight` says whether a params["output"] leaf can take the fused
path (a plain array, or LoRA over a plain array without dropout, merged); other weight types (int4 bases,
LoRA with dropout) go through `layers.linear` chunk by chunk instead (`generic_*`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from internlm_jax.layers import linear
from internlm_jax.sharding import constrain

LOGITS_NAMES = ("batch", "length", "act_vocab")
# Auto chunk: at most this many fp32 logits bytes live per chunk ([B, c, V] * 4).
DEFAULT_CHUNK_BYTES = 32 * 2**20


def auto_chunk(batch: int, length: int, vocab: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Positions per chunk so that [batch, chunk, vocab] fp32 logits stay within `budget_bytes` (>= 1, <= T)."""
    per_position = max(batch * vocab * 4, 1)
    return int(max(1, min(length, budget_bytes // per_position)))


def head_weight(w: Any) -> jax.Array | None:
    """The dense [D, V] weight the fused path can use for params["output"], or None (use the generic path).

    A LoRA weight over a dense base without active dropout is merged (base + scale * a @ b); gradients reach
    a and b through the merge. Anything else (int4 base, dropout) returns None.
    """
    if not hasattr(w, "linear"):
        return w
    from internlm_jax.peft import LoraWeight

    if isinstance(w, LoraWeight) and w.lead_ndim == 0 and w.in_ndim == 1 and w.b.ndim == 2 \
            and (w.dropout == 0.0 or w.dropout_key is None) and isinstance(w.base, jax.Array):
        base = w.base
        return (base.astype(jnp.float32) + w.delta(jnp.float32)).astype(base.dtype)
    return None


# ---- chunking helpers ------------------------------------------------------------------------------------
def _chunks(x: jax.Array, c: int, n: int, fill: Any) -> jax.Array:
    """[B, T, ...] -> [n, B, c, ...], padding T up to n * c with `fill`."""
    B, T = x.shape[:2]
    pad = n * c - T
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(B, n, c, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x: jax.Array, T: int) -> jax.Array:
    """[n, B, c, ...] -> [B, T, ...] (drops padding)."""
    n, B, c = x.shape[:3]
    return x.swapaxes(0, 1).reshape(B, n * c, *x.shape[3:])[:, :T]


def _plan(T: int, chunk: int, B: int, V: int) -> tuple[int, int]:
    c = auto_chunk(B, T, V) if chunk <= 0 else min(chunk, T)
    return c, -(-T // c)


def _logits(hc: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    out = jnp.einsum("bcd,dv->bcv", hc.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return constrain(out, LOGITS_NAMES)


def _lse_target(logits: jax.Array, tc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """lse [B, c], target logit [B, c], and the clipped targets (padding -1 -> 0; those carry zero weight)."""
    V = logits.shape[-1]
    safe = jnp.clip(tc, 0, V - 1).astype(jnp.int32)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1)) + m[..., 0]
    tl = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return lse, tl, safe


def _dlogits(logits: jax.Array, lse: jax.Array, safe: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """a * softmax - b * onehot(target), [B, c, V] fp32 (a, b: [B, c])."""
    p = jnp.exp(logits - lse[..., None])
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == safe[..., None]
    return a[..., None] * p - jnp.where(hit, b[..., None], 0.0)


def _grads(hc: jax.Array, w: jax.Array, g: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """dh [B, c, D] (fp32) = g @ w^T and the chunk's dw [D, V] (fp32) = h^T @ g."""
    gd = g.astype(dtype)
    dh = jnp.einsum("bcv,dv->bcd", gd, w.astype(dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcd,bcv->dv", hc.astype(dtype), gd, preferred_element_type=jnp.float32)
    return dh, dw


# ---- sums (the next-token loss) --------------------------------------------------------------------------
def _sums_primal(h, w, targets, weights, z_loss, chunk, dtype):
    B, T, _ = h.shape
    c, n = _plan(T, chunk, B, w.shape[-1])
    xs = (_chunks(h, c, n, 0), _chunks(targets, c, n, -1), _chunks(weights.astype(jnp.float32), c, n, 0))

    def piece(carry, x):
        hc, tc, mc = x
        lse, tl, _ = _lse_target(_logits(hc, w, dtype), tc)
        return (carry[0] + jnp.sum((lse - tl) * mc), carry[1] + jnp.sum(lse * lse * mc)), (lse - tl, lse)

    (ce_sum, z_sum), (ce, lse) = jax.lax.scan(piece, (jnp.float32(0), jnp.float32(0)), xs)
    return (ce_sum + z_loss * z_sum, ce_sum, z_sum), (_unchunk(ce, T), _unchunk(lse, T))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sums(h, w, targets, weights, z_loss, chunk, dtype):
    return _sums_primal(h, w, targets, weights, z_loss, chunk, dtype)[0]


def _sums_fwd(h, w, targets, weights, z_loss, chunk, dtype):
    B, T, D = h.shape
    V = w.shape[-1]
    c, n = _plan(T, chunk, B, V)
    xs = (_chunks(h, c, n, 0), _chunks(targets, c, n, -1), _chunks(weights.astype(jnp.float32), c, n, 0))

    def piece(carry, x):
        ce_sum, z_sum, dw = carry
        hc, tc, mc = x
        logits = _logits(hc, w, dtype)
        lse, tl, safe = _lse_target(logits, tc)
        g = _dlogits(logits, lse, safe, mc * (1.0 + 2.0 * z_loss * lse), mc)
        dh, dw_c = _grads(hc, w, g, dtype)
        ce = lse - tl
        return (ce_sum + jnp.sum(ce * mc), z_sum + jnp.sum(lse * lse * mc), dw + dw_c), (dh, ce + z_loss * lse * lse)

    init = (jnp.float32(0), jnp.float32(0), jnp.zeros((D, V), jnp.float32))
    (ce_sum, z_sum, dw), (dh, per_token) = jax.lax.scan(piece, init, xs)
    out = (ce_sum + z_loss * z_sum, ce_sum, z_sum)
    # zero-size markers carry the primal dtypes to the backward (cotangents must match them)
    return out, (_unchunk(dh, T), dw, _unchunk(per_token, T), jnp.zeros((0,), h.dtype), jnp.zeros((0,), w.dtype))


def _sums_bwd(z_loss, chunk, dtype, res, cts):
    dh, dw, per_token, h_like, w_like = res
    g = cts[0]  # ce_sum and z_sum leave through stop_gradient (see head_ce_sums): their cotangents are zero
    return (g * dh).astype(h_like.dtype), (g * dw).astype(w_like.dtype), None, g * per_token


_sums.defvjp(_sums_fwd, _sums_bwd)


def head_ce_sums(h: Float[Array, "B T D"], w: Float[Array, "D V"], targets: Int[Array, "B T"],
                 weights: Float[Array, "B T"], *, z_loss: float = 0.0, chunk: int = 0, dtype: Any = jnp.float32
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective, ce_sum, z_sum) of the output head over hidden states h, fused (see the module docstring).

    targets: next-token ids (out-of-range ids, e.g. -1 padding, must carry zero weight); weights: per-token
    loss weights (the loss mask). chunk: positions per chunk (0 = auto: <= 32 MiB of logits). dtype: matmul
    input dtype (the model's compute dtype). Differentiable w.r.t. h, w and weights through `objective`.
    """
    _check(h, w, targets)
    obj, ce_sum, z_sum = _sums(h, w, targets, weights.astype(jnp.float32), float(z_loss), int(chunk),
                               jnp.dtype(dtype))
    return obj, jax.lax.stop_gradient(ce_sum), jax.lax.stop_gradient(z_sum)


# ---- per-token values (DPO, RL) --------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token(h, w, targets, chunk, dtype):
    return _sums_primal(h, w, targets, jnp.zeros(targets.shape, jnp.float32), 0.0, chunk, dtype)[1]


def _token_fwd(h, w, targets, chunk, dtype):
    ce, lse = _sums_primal(h, w, targets, jnp.zeros(targets.shape, jnp.float32), 0.0, chunk, dtype)[1]
    return (ce, lse), (h, w, targets, lse)


def _token_bwd(chunk, dtype, res, cts):
    h, w, targets, lse = res
    dce, dlse = cts
    B, T, D = h.shape
    V = w.shape[-1]
    c, n = _plan(T, chunk, B, V)
    xs = (_chunks(h, c, n, 0), _chunks(targets, c, n, -1), _chunks(lse, c, n, 0),
          _chunks(dce.astype(jnp.float32), c, n, 0), _chunks(dlse.astype(jnp.float32), c, n, 0))

    def piece(dw, x):
        hc, tc, lc, ac, bc = x
        logits = _logits(hc, w, dtype)
        safe = jnp.clip(tc, 0, V - 1).astype(jnp.int32)
        g = _dlogits(logits, lc, safe, ac + bc, ac)
        dh, dw_c = _grads(hc, w, g, dtype)
        return dw + dw_c, dh

    dw, dh = jax.lax.scan(piece, jnp.zeros((D, V), jnp.float32), xs)
    return _unchunk(dh, T).astype(h.dtype), dw.astype(w.dtype), None


_token.defvjp(_token_fwd, _token_bwd)


def head_token_ce(h: Float[Array, "B T D"], w: Float[Array, "D V"], targets: Int[Array, "B T"], *,
                  chunk: int = 0, dtype: Any = jnp.float32) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Per-token cross-entropy (= -log p(target)) and logsumexp, fp32, fused; differentiable in both."""
    _check(h, w, targets)
    return _token(h, w, targets, int(chunk), jnp.dtype(dtype))


def _check(h: jax.Array, w: jax.Array, targets: jax.Array) -> None:
    if h.ndim != 3 or w.ndim != 2 or h.shape[-1] != w.shape[0] or targets.shape != h.shape[:2]:
        raise ValueError(f"fused head wants h [B, T, D], w [D, V], targets [B, T]; got h {h.shape}, "
                         f"w {w.shape}, targets {targets.shape}")


# ---- the dispatchers the losses call ---------------------------------------------------------------------
def output_ce_sums(h: Float[Array, "B T D"], w: Any, targets: Int[Array, "B T"], weights: Float[Array, "B T"],
                   *, z_loss: float = 0.0, chunk: int = 0, dtype: Any = jnp.float32, fused: bool = True
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective, ce_sum, z_sum) for params["output"] of any weight type: fused when `head_weight` allows
    (and `fused`), else the generic chunked path through layers.linear."""
    dense = head_weight(w) if fused else None
    if dense is not None:
        return head_ce_sums(h, dense, targets, weights, z_loss=z_loss, chunk=chunk, dtype=dtype)
    ce, lse = generic_token_ce(h, w, targets, chunk=chunk, dtype=dtype)
    weights = weights.astype(jnp.float32)
    ce_sum, z_sum = jnp.sum(ce * weights), jnp.sum(lse * lse * weights)
    return (ce_sum + z_loss * z_sum if z_loss else ce_sum), ce_sum, z_sum


def output_token_ce(h: Float[Array, "B T D"], w: Any, targets: Int[Array, "B T"], *, chunk: int = 0,
                    dtype: Any = jnp.float32, fused: bool = True) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Per-token (ce, lse) for params["output"] of any weight type (fused when possible)."""
    dense = head_weight(w) if fused else None
    if dense is not None:
        return head_token_ce(h, dense, targets, chunk=chunk, dtype=dtype)
    return generic_token_ce(h, w, targets, chunk=chunk, dtype=dtype)


def generic_token_ce(h: Float[Array, "B T D"], w: Any, targets: Int[Array, "B T"], *, chunk: int = 0,
                     dtype: Any = jnp.float32) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Per-token (ce, lse) through `layers.linear` (any weight type), autodiff. chunk <= 0: one pass over the
    whole length ([B, T, V] logits); else a rematerialised scan over length chunks."""
    T = h.shape[1]

    def piece(hc, tc):
        logits = constrain(linear(hc, w, "D", "V", jnp.dtype(dtype)).astype(jnp.float32), LOGITS_NAMES)
        return token_cross_entropy(logits, tc)

    if chunk <= 0 or chunk >= T:
        return piece(h, targets)
    n = -(-T // chunk)
    step = jax.checkpoint(lambda _, x: (None, piece(*x)))
    _, (ce, lse) = jax.lax.scan(step, None, (_chunks(h, chunk, n, 0), _chunks(targets, chunk, n, -1)))
    return _unchunk(ce, T), _unchunk(lse, T)


def token_cross_entropy(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]
                        ) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Per-token cross-entropy and logsumexp of given logits, in fp32 (targets out of range are clipped: give
    them zero weight). Only [B, T] results are kept: no log-softmax copy of the logits."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1).astype(jnp.int32)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return lse - target_logit, lse


# ---- the pure-JAX reference ------------------------------------------------------------------------------
def reference_token_ce(h: Float[Array, "B T D"], w: Float[Array, "D V"], targets: Int[Array, "B T"], *,
                       dtype: Any = jnp.float32) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """The unfused definition: full logits -> log_softmax -> -logp[target], and logsumexp."""
    logits = jnp.einsum("btd,dv->btv", h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.clip(targets, 0, w.shape[-1] - 1).astype(jnp.int32)
    return -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0], jax.nn.logsumexp(logits, axis=-1)


def reference_ce_sums(h: Float[Array, "B T D"], w: Float[Array, "D V"], targets: Int[Array, "B T"],
                      weights: Float[Array, "B T"], *, z_loss: float = 0.0, dtype: Any = jnp.float32
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    ce, lse = reference_token_ce(h, w, targets, dtype=dtype)
    weights = weights.astype(jnp.float32)
    ce_sum, z_sum = jnp.sum(ce * weights), jnp.sum(lse * lse * weights)
    return ce_sum + z_loss * z_sum, ce_sum, z_sum
