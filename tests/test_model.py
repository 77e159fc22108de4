"""Invariants of the functional model that need no reference: cached == uncached, packed == separate, and the
parameter counts of the real sizes from shapes alone."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.config import get_preset
from internlm_jax.model import forward, init_cache, init_params, param_shapes

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    config = get_preset("internlm2-tiny")
    return config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))


def test_cached_decoding_equals_uncached_forward(tiny):
    config, params = tiny
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)), jnp.int32)
    fwd = jax.jit(lambda p, t, c: forward(p, t, config=config, cache=c))
    full, _ = fwd(params, tokens, None)
    assert float(jnp.std(full)) > 0.1  # logits that differ between positions, so a shifted position shows

    cache = init_cache(config, batch=2, max_len=16)
    pieces = []
    for lo, hi in [(0, 4), (4, 8), *[(i, i + 1) for i in range(8, 12)]]:  # prefill, a chunk, then one at a time
        logits, cache = fwd(params, tokens[:, lo:hi], cache)
        pieces.append(logits)
    assert int(cache["index"]) == 12
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full), atol=TOL, rtol=0)


def test_packed_sequences_equal_separate_runs(tiny):
    config, params = tiny
    rng = np.random.default_rng(1)
    lengths = [5, 9, 2]
    docs = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in lengths]
    tokens = np.concatenate(docs)[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    packed, _ = jax.jit(lambda p, t, pos, seg: forward(p, t, pos, config=config, segment_ids=seg))(
        params, tokens, positions, segments)
    # The separate runs, batched with right padding: causal attention keeps each row's first n logits
    # independent of what follows them.
    alone_batch = np.zeros((len(docs), max(lengths)), np.int32)
    for i, doc in enumerate(docs):
        alone_batch[i, :len(doc)] = doc
    alone, _ = jax.jit(lambda p, t: forward(p, t, config=config))(params, alone_batch)
    start = 0
    for i, doc in enumerate(docs):
        np.testing.assert_allclose(np.asarray(packed[0, start:start + len(doc)]), np.asarray(alone[i, :len(doc)]),
                                   atol=TOL, rtol=0)
        start += len(doc)


# Independently computed: 2*V*D + D + L*(D*K*(G+2)*H + K*G*H*D + 3*D*F + 2*D) with INTERNLM2.md's table.
@pytest.mark.parametrize("preset,count", [
    ("internlm2-1_8b", 1_889_110_016),
    ("internlm2-7b", 7_737_708_544),
    ("internlm2-20b", 19_861_149_696),
])
def test_real_size_param_counts_from_shapes(preset, count):
    config = get_preset(preset, param_dtype="float16")
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    leaves = jax.tree.leaves(shapes)
    assert sum(math.prod(x.shape) for x in leaves) == count == config.num_params()
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(
        tuple, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    if preset == "internlm2-7b":  # the released fp16 index's metadata.total_size
        assert sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves) == 15_475_417_088
        assert all(x.dtype == jnp.float16 for x in leaves)
