"""Shared inputs and checks for the flash-attention kernel tests (TPU and GPU variants in interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash_attention import BlockSizes, flash_attention, flash_attention_reference

# Small blocks so that even short sequences span several blocks (and the last one is partial).
BLOCKS = {"tpu": BlockSizes(block_q=32, block_k=128, block_q_dkv=16, block_k_dkv=128, block_q_dq=32, block_k_dq=128),
          "gpu": BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)}
# (forward atol, gradient atol relative to the gradient's max magnitude)
TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}


def _inputs(B, T, S, K, G, H, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, K, G, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[3], (B, T, K, G, H), jnp.float32).astype(dtype)
    return q, k, v, ct


def _segments(B, T, seed=0):
    """Packed documents of random lengths (>= 1 token each), ids increasing along the row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=min(3, T - 1), replace=False))
        rows.append(np.searchsorted(cuts, np.arange(T), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _check(backend, B, T, S, K, G, H, dtype=jnp.float32, grads=True, **kw):
    """Kernel vs reference: outputs, and (with grads) dq/dk/dv of sum(out * ct), one compile per side."""
    q, k, v, ct = _inputs(B, T, S, K, G, H, dtype)
    opts = {"backend": backend, "block_sizes": BLOCKS[backend], "interpret": True}

    def run(fn, extra):
        def f(q, k, v):
            if not grads:
                return fn(q, k, v, **kw, **extra), None
            out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, **kw, **extra), q, k, v)
            return out, pull(ct)
        return jax.jit(f)(q, k, v)

    out, g_out = run(flash_attention, opts)
    ref, g_ref = run(flash_attention_reference, {})
    assert out.shape == q.shape and out.dtype == q.dtype
    f_tol, g_tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=f_tol, rtol=f_tol)
    if not grads:
        return
    for name, a, b in zip("qkv", g_out, g_ref):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(1.0, float(np.max(np.abs(b))))
        np.testing.assert_allclose(a, b, atol=g_tol * scale, rtol=g_tol, err_msg=f"d{name} ({backend})")
