"""The paged-cache forward (reached through model.forward's cache dispatch) against the uncached forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.config import ConfigError, get_preset
from internlm_jax.engine import PagedCache, init_paged_cache
from internlm_jax.model import forward, init_params

CFG = get_preset("internlm2-tiny")


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_chunked_paged_forward_equals_uncached_with_nan_filled_pool(params):
    """Two rows of different lengths on scattered pages; every slot not written by them is NaN."""
    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, config=CFG, cache=c))
    toks = np.asarray(jax.random.randint(jax.random.key(1), (2, 30), 3, CFG.vocab_size))
    c = init_paged_cache(CFG, 20, 4, batch=2, max_pages_per_seq=8)
    c = PagedCache(jnp.full_like(c.k, jnp.nan), jnp.full_like(c.v, jnp.nan), None, None, c.page_table, c.lengths)
    table = jnp.array([[7, 3, 12, 0, 19, 5, 9, 1], [2, 18, 4, 11, 6, 15, 8, 13]], jnp.int32)
    c = c.with_rows(table, jnp.zeros((2,), jnp.int32))
    lens = [30, 21]  # row 1 is shorter: its tail tokens are padding (position -1)
    outs = []
    for start, n in ((0, 9), (9, 9), (18, 1), (19, 11)):  # uneven chunks, a decode step in the middle
        pos = np.full((2, n), -1, np.int32)
        for b in range(2):
            k = max(0, min(n, lens[b] - start))
            pos[b, :k] = np.arange(start, start + k)
        logits, c = step(params, toks[:, start:start + n], pos, c)
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)
    assert list(np.asarray(c.lengths)) == lens
    for b in range(2):
        ref, _ = forward(params, toks[b:b + 1, :lens[b]], config=CFG)
        np.testing.assert_allclose(got[b, :lens[b]], np.asarray(ref)[0], atol=2e-5, rtol=0)
    # exactly the slots of real tokens were written (padding dropped), everything else is still NaN
    written = ~np.isnan(np.asarray(c.k[0, :, :, 0, 0]))
    expect = np.zeros((20, 4), bool)
    for b in range(2):
        for p in range(lens[b]):
            expect[int(table[b, p // 4]), p % 4] = True
    assert (written == expect).all()


def test_row_mismatch_is_a_clear_error(params):
    c = init_paged_cache(CFG, 4, 4, batch=1, max_pages_per_seq=2)
    with pytest.raises(ConfigError, match="with_rows"):
        forward(params, jnp.zeros((2, 3), jnp.int32), config=CFG, cache=c)
    with pytest.raises(ConfigError, match="kv_dtype"):
        init_paged_cache(CFG, 4, 4, kv_dtype="int4")


@pytest.mark.slow  # Pallas interpret mode on CPU: ~1.5-2.5 min each on a shared 2-core host
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_pallas_paged_kernel_path_matches_the_gather(params, kv_dtype):
    """attention_impl='pallas' (the kernel; interpret mode on CPU) gives the reference path's decode logits."""
    pytest.importorskip("kernels_pallas.paged_attention")
    toks = jax.random.randint(jax.random.key(3), (2, 11), 3, CFG.vocab_size)
    table = jnp.array([[4, 1, 6], [0, 5, 2]], jnp.int32)
    outs = {}
    for impl in ("reference", "pallas"):
        cfg = CFG.replace(attention_impl=impl)
        c = init_paged_cache(cfg, 8, 4, kv_dtype=kv_dtype, batch=2, max_pages_per_seq=3).with_rows(
            table, jnp.zeros((2,), jnp.int32))
        _, c = forward(params, toks[:, :9], config=cfg.replace(attention_impl="reference"), cache=c)
        step = jax.jit(lambda p, t, c, cfg=cfg: forward(p, t, config=cfg, cache=c))
        a, c = step(params, toks[:, 9:10], c)
        b, c = step(params, toks[:, 10:11], c)
        outs[impl] = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    np.testing.assert_allclose(outs["pallas"], outs["reference"], atol=2e-5, rtol=0)
