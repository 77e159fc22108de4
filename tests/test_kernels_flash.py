"""Flash attention, TPU (Mosaic) variant in Pallas interpret mode, against the pure-JAX reference: forward and
gradients across GQA groups, segment ids, sliding windows, T < S, and lengths that are not block multiples.
Plus block-size and input validation. The GPU variant is tested in test_kernels_flash_gpu.py."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from kernel_cases import _check, _inputs, _segments

from kernels_pallas.flash_attention import BlockSizes, flash_attention, flash_attention_reference


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_causal_gqa_segments_forward_and_grads():
    T = 150  # two key blocks of 128 and five query blocks of 32, the last ones partial
    _check("tpu", B=2, T=T, S=T, K=2, G=4, H=32, segment_ids=_segments(2, T))


def test_sliding_window_with_fewer_queries_than_keys():
    # Tiles inside the band (query blocks 3-4 x key block 0) take the unmasked path; edges the masked one.
    _check("tpu", B=1, T=260, S=300, K=1, G=2, H=16, sliding_window=200)


def test_bfloat16_forward():
    _check("tpu", B=1, T=40, S=40, K=2, G=2, H=64, dtype=jnp.bfloat16, grads=False,
           segment_ids=_segments(1, 40))


def test_default_block_sizes_and_auto_backend():
    """The defaults (one block for a short sequence) and backend='auto' (TPU kernels interpreted on CPU)."""
    import numpy as np

    q, k, v, _ = _inputs(2, 21, 21, 2, 2, 32, jnp.float32)
    np.testing.assert_allclose(flash_attention(q, k, v), flash_attention_reference(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("G,T", [(1, 17), (2, 131), (4, 260), (8, 77)])
def test_sweep(G, T):
    _check("tpu", B=2, T=T, S=T, K=2, G=G, H=32, segment_ids=_segments(2, T, seed=T))
    _check("tpu", B=1, T=T, S=T, K=1, G=G, H=64, sliding_window=T // 3 + 1)
    _check("tpu", B=1, T=T, S=T, K=1, G=G, H=128, causal=False, dtype=jnp.bfloat16)


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="positive int"):
        BlockSizes(block_q=0)
    with pytest.raises(ValueError, match="block_k=64 must be a power of two >= 128"):
        BlockSizes(block_q=32, block_k=64).validate("tpu")
    with pytest.raises(ValueError, match="block_q=24 must be a power of two >= 16"):
        BlockSizes(block_q=24, block_k=128).validate("tpu")
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48, block_k=64).validate("gpu")


def test_input_validation_messages():
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"q must be \[B, T, K, G, H\]"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="do not match q"):
        flash_attention(q, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="head dim 24"):
        flash_attention(jnp.zeros((1, 8, 2, 2, 24)), jnp.zeros((1, 8, 2, 24)), jnp.zeros((1, 8, 2, 24)))
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="segment_ids must be"):
        flash_attention(q, k, v, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window needs causal"):
        flash_attention(q, k, v, causal=False, sliding_window=4)
    with pytest.raises(ValueError, match="exceeds key length"):
        flash_attention(jnp.concatenate([q, q], 1), k, v)
    with pytest.raises(ValueError, match="backend must be"):
        flash_attention(q, k, v, backend="rocm")
