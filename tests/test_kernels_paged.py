"""Paged decode attention kernels (TPU and GPU variants, Pallas interpret mode) against the pure-JAX reference.

Every slot a sequence does not own (other pages, the unused tail of its last page) holds NaN, and page-table
entries past a sequence's pages point at random pages, so any read of the wrong memory makes the output NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_attention import combine_splits, paged_attention, paged_attention_reference

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def make_case(lengths, T=2, K=2, G=2, H=32, page_size=16, num_pages=None, max_pages=None, dtype=jnp.float32,
              int8=False, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    B = len(lengths)
    need = [-(-int(n) // page_size) for n in lengths]
    P = num_pages or sum(need) + 3
    M = max_pages or max(need) + 1
    k = np.full((P, page_size, K, H), np.nan, np.float32)
    v = np.full((P, page_size, K, H), np.nan, np.float32)
    table = rng.integers(0, P, (B, M)).astype(np.int32)  # garbage past each sequence's pages
    perm = rng.permutation(P)
    used = 0
    for b in range(B):
        pages = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = pages
        for i, page in enumerate(pages):
            n = min(page_size, lengths[b] - i * page_size)
            k[page, :n] = rng.normal(size=(n, K, H))
            v[page, :n] = rng.normal(size=(n, K, H))
    q_pos = np.stack([lengths - T + t for t in range(T)], axis=1).astype(np.int32)
    q_pos = np.maximum(q_pos, -1)  # sequences shorter than T: leading queries are padding (-1)
    q = rng.normal(size=(B, T, K, G, H)).astype(np.float32)
    case = {"q": jnp.asarray(q, dtype), "page_table": jnp.asarray(table), "lengths": jnp.asarray(lengths),
                "q_positions": jnp.asarray(q_pos)}
    if not int8:
        return case | {"k_pages": jnp.asarray(k, dtype), "v_pages": jnp.asarray(v, dtype)}
    for name, x in (("k", k), ("v", v)):
        filled = ~np.isnan(x[..., 0])
        scale = np.where(filled, np.abs(np.nan_to_num(x)).max(-1) / 127.0 + 1e-3, np.nan).astype(np.float32)
        quant = np.clip(np.round(np.nan_to_num(x) / np.nan_to_num(scale, nan=1.0)[..., None]), -127, 127)
        case[f"{name}_pages"] = jnp.asarray(quant.astype(np.int8))
        case[f"{name}_scales"] = jnp.asarray(scale)  # NaN scales on unowned slots
    return case


def _check(case, backend, dtype=jnp.float32, **opts):
    out = paged_attention(**case, backend=backend, interpret=True, **opts)
    ref = paged_attention_reference(**case)
    assert out.shape == case["q"].shape and out.dtype == case["q"].dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(ref).any(), "reference read unowned memory"
    assert not np.isnan(out).any(), "kernel read unowned memory"
    np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_ragged_chunked_with_splits(backend):
    """Lengths 37 (partial page), 1, 64 (exact pages), 90; two queries each; 2 pages per step, 3 splits."""
    _check(make_case([37, 1, 64, 90], T=2, G=4), backend, pages_per_block=2, num_splits=3)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_int8_kv(backend):
    _check(make_case([50, 3], T=1, G=2, int8=True), backend, pages_per_block=1, num_splits=2)


def test_bfloat16_decode_gpu_and_tpu():
    case = make_case([33, 70], T=1, G=8, H=64, dtype=jnp.bfloat16)
    _check(case, "tpu", jnp.bfloat16, pages_per_block=4, num_splits=1)
    _check(case, "gpu", jnp.bfloat16, pages_per_block=2, num_splits=2)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_stacked_pool_reads_the_given_layer_in_place(backend):
    """layer=... indexes a [L, P, ...] stack (traced index); the other layer is NaN, so reading it fails."""
    case = make_case([21, 40], T=1, int8=True)
    stacked = dict(case)
    for name in ("k_pages", "v_pages", "k_scales", "v_scales"):
        junk = jnp.full_like(case[name], jnp.nan) if case[name].dtype == jnp.float32 else case[name][::-1]
        stacked[name] = jnp.stack([junk, case[name], junk])
    run = jax.jit(lambda c, layer: paged_attention(**c, layer=layer, backend=backend, interpret=True, num_splits=2))
    out = np.asarray(run(stacked, jnp.int32(1)))
    ref = np.asarray(paged_attention_reference(**case))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(paged_attention_reference(**stacked, layer=1), ref, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("page_size,G,T", [(16, 1, 1), (32, 2, 3), (64, 4, 1), (16, 8, 3)])
def test_sweep(backend, page_size, G, T):
    case = make_case([5, page_size, 3 * page_size + 7, 200], T=T, G=G, page_size=page_size, seed=G * 10 + T)
    _check(case, backend, pages_per_block=2, num_splits=2)
    _check(make_case([9, 130], T=T, G=G, page_size=page_size, int8=True), backend)


def test_combine_splits_of_disjoint_ranges_equals_full_softmax():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(1, 1, 3, 4, 10)).astype(np.float32)  # [B, K, splits, R, keys]
    vals = rng.normal(size=(10, 5)).astype(np.float32)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    o = (p / p.sum(-1, keepdims=True)) @ vals
    lse = np.log(p.sum(-1)) + scores.max(-1)
    lse[0, 0, 1, 2] = -np.inf  # split 1 saw no key for row 2
    o[0, 0, 1, 2] = 0.0
    full = scores.transpose(0, 1, 3, 2, 4).reshape(1, 1, 4, 30)
    full[0, 0, 2, 10:20] = -np.inf
    pf = np.exp(full - full.max(-1, keepdims=True))
    expected = (pf / pf.sum(-1, keepdims=True)) @ np.concatenate([vals] * 3, 0)
    np.testing.assert_allclose(combine_splits(jnp.asarray(o), jnp.asarray(lse)), expected, atol=1e-5)


def test_validation_messages():
    case = make_case([5], T=1)
    with pytest.raises(ValueError, match="q_positions"):
        paged_attention(**(case | {"q_positions": case["q_positions"][:, :0]}))
    with pytest.raises(ValueError, match="page_table must be int32"):
        paged_attention(**(case | {"page_table": case["page_table"].astype(jnp.float32)}))
    with pytest.raises(ValueError, match="both k_scales and v_scales"):
        paged_attention(**case, k_scales=jnp.ones(case["k_pages"].shape[:3]))
    with pytest.raises(TypeError, match="must be int8"):
        paged_attention(**case, k_scales=jnp.ones(case["k_pages"].shape[:3]),
                        v_scales=jnp.ones(case["k_pages"].shape[:3]))
    with pytest.raises(ValueError, match="page_size=24 must be a power of two"):
        paged_attention(**make_case([5], T=1, page_size=24), backend="gpu", interpret=True)
