"""int4 weight-only matmul: the packed format (quantise / dequantise round trip, packing layout), and the TPU and
GPU kernels (Pallas interpret mode) against the pure-JAX reference, decode and prefill shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.int4_matmul import (
    BlockSizes,
    Int4Weight,
    dequantize_int4,
    int4_matmul,
    int4_matmul_reference,
    quantize_int4,
)


def _weight(din=256, dout=192, seed=0, shift=0.0):
    return jax.random.normal(jax.random.PRNGKey(seed), (din, dout), jnp.float32) * 0.1 + shift


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [64, 128])
def test_round_trip_error_is_within_half_a_step(symmetric, group_size):
    w = _weight(shift=0.0 if symmetric else 0.03)
    qw = quantize_int4(w, group_size, symmetric)
    assert qw.packed.dtype == jnp.uint8 and qw.packed.shape == (128, 192)
    assert qw.scales.shape == (256 // group_size, 192)
    assert (qw.zeros is None) == symmetric
    err = jnp.abs(dequantize_int4(qw) - w).reshape(256 // group_size, group_size, 192)
    step = qw.scales[:, None, :]
    assert bool(jnp.all(err <= 0.5 * step + 1e-6))


def test_packing_layout_is_half_split_per_group():
    """Byte i of a group holds row i (low nibble) and row i + g/2 (high nibble)."""
    g = 64
    w = jnp.zeros((128, 128)).at[3, 5].set(7.0).at[3 + g // 2, 5].set(-7.0).at[70, 9].set(7.0)
    qw = quantize_int4(w, g, symmetric=True)
    p = np.asarray(qw.packed)
    assert p[3, 5] == (8 + 7) | ((8 - 7) << 4)
    assert p[g // 2 + 6, 9] == (8 + 7) | (8 << 4)  # row 70 = group 1, row 6 of it: low nibble
    np.testing.assert_allclose(dequantize_int4(qw), w, atol=1e-6)


def test_zero_group_and_nd_weights_and_vmap():
    w = jnp.zeros((2, 64, 4, 32)).at[:, :, 1].set(1.0)  # [L, Din, K, H]; stacked on a layer axis
    qw = jax.vmap(lambda x: quantize_int4(x, 64, symmetric=False))(w)
    assert qw.in_shape == (64,) and qw.out_shape == (4, 32) and qw.packed.shape == (2, 32, 128)
    one = jax.tree.map(lambda a: a[1], qw)
    np.testing.assert_allclose(dequantize_int4(one), w[1], atol=1e-6)
    x = jnp.ones((3, 5, 64))
    y = one.linear(x, "D", "KH", jnp.float32)  # the layers.linear hook
    np.testing.assert_allclose(y, jnp.einsum("abd,dkh->abkh", x, w[1]), atol=1e-4)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_matches_reference_decode_and_prefill(backend, symmetric):
    qw = quantize_int4(_weight(din=1024, dout=256, shift=0.0 if symmetric else 0.02), 64, symmetric)
    # Prefill blocks: several row, column and Din blocks (and GPU split-K).
    prefill = BlockSizes(16, 128, 512) if backend == "tpu" else BlockSizes(16, 64, 128, splits=2)
    for m, blocks in ((3, None), (40, prefill)):
        x = jax.random.normal(jax.random.PRNGKey(m), (m, 1024), jnp.float32).astype(jnp.bfloat16)
        y = int4_matmul(x, qw, block_sizes=blocks, backend=backend, interpret=True)
        ref = int4_matmul_reference(x, qw)
        assert y.shape == (m, 256) and y.dtype == jnp.bfloat16
        # Same products in fp32; only the bf16 rounding of the output may differ.
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)


def test_float32_is_tight_and_gpu_split_k():
    qw = quantize_int4(_weight(din=512, dout=128), 128, True)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 512), jnp.float32)
    ref = int4_matmul_reference(x, qw)
    y_tpu = int4_matmul(x, qw, backend="tpu", interpret=True, block_sizes=BlockSizes(16, 128, 512))
    y_gpu = int4_matmul(x, qw, backend="gpu", interpret=True, block_sizes=BlockSizes(16, 32, 128, splits=2))
    np.testing.assert_allclose(y_tpu, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(y_gpu, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(ref, x @ dequantize_int4(qw), atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("m,group_size", [(1, 128), (16, 64), (100, 128)])
def test_sweep(backend, m, group_size):
    for symmetric in (True, False):
        qw = quantize_int4(_weight(din=1024, dout=256, seed=m), group_size, symmetric)
        x = jax.random.normal(jax.random.PRNGKey(m), (m, 1024), jnp.float32)
        y = int4_matmul(x, qw, backend=backend, interpret=True)
        np.testing.assert_allclose(y, int4_matmul_reference(x, qw), atol=5e-5, rtol=5e-5)


def test_validation_messages():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(jnp.ones((100, 8)), 64)
    with pytest.raises(ValueError, match="group_size must be"):
        quantize_int4(jnp.ones((128, 8)), 100)
    qw = quantize_int4(_weight(), 64)
    with pytest.raises(ValueError, match=r"x must be \[M, Din=256\]"):
        int4_matmul(jnp.ones((2, 255)), qw)
    with pytest.raises(TypeError, match="Int4Weight"):
        int4_matmul(jnp.ones((2, 256)), jnp.ones((256, 192)))
    with pytest.raises(ValueError, match="block_k=96"):
        int4_matmul(jnp.ones((2, 256)), qw, block_sizes=BlockSizes(16, 64, 96), backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="stacked weights"):
        stacked = jax.tree.map(lambda a: jnp.stack([a, a]), qw)
        int4_matmul(jnp.ones((2, 256)), stacked)
    assert isinstance(qw, Int4Weight)
