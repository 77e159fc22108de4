"""Flash attention, GPU (Triton) variant in Pallas interpret mode, against the pure-JAX reference: forward and
gradients (dK/dV accumulated over the G query heads of a group) across GQA groups, segment ids, sliding
windows, T < S and partial blocks."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from kernel_cases import _check, _segments


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_causal_gqa_segments_forward_and_grads():
    _check("gpu", B=2, T=45, S=45, K=2, G=4, H=32, segment_ids=_segments(2, 45))


def test_sliding_window_with_fewer_queries_than_keys():
    # Query block 1 x key block 0 lies inside the band (unmasked path); the rest of the band is masked.
    _check("gpu", B=1, T=60, S=64, K=1, G=2, H=16, sliding_window=40)


def test_bfloat16_forward():
    _check("gpu", B=1, T=40, S=40, K=2, G=2, H=64, dtype=jnp.bfloat16, grads=False,
           segment_ids=_segments(1, 40))


@pytest.mark.slow
@pytest.mark.parametrize("G,T", [(1, 17), (2, 131), (4, 64), (8, 77)])
def test_sweep(G, T):
    _check("gpu", B=2, T=T, S=T, K=2, G=G, H=32, segment_ids=_segments(2, T, seed=T))
    _check("gpu", B=1, T=T, S=T, K=1, G=G, H=64, sliding_window=T // 3 + 1)
    _check("gpu", B=1, T=T, S=T, K=1, G=G, H=128, causal=False, dtype=jnp.bfloat16)
