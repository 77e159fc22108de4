"""Sequence-parallel attention over 8 simulated devices equals single-device attention (values and gradients)
on a packed sequence of several thousand tokens, with zigzag load balancing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.layers import attention_mask, reference_attention
from internlm_jax.seq_parallel import sequence_parallel_attention, zigzag_order
from internlm_jax.sharding import MeshConfig, make_mesh

T, K, G, H = 4096, 2, 2, 16


def _packed(t, rng):
    bounds = np.sort(rng.choice(np.arange(1, t), size=5, replace=False))
    seg = np.zeros(t, np.int32)
    pos = np.zeros(t, np.int32)
    start = 0
    for i, end in enumerate(list(bounds) + [t]):
        seg[start:end] = i + 1
        pos[start:end] = np.arange(end - start)
        start = end
    return seg[None], pos[None]


def test_zigzag_balances_causal_work():
    order = zigzag_order(64, 4).reshape(4, 16)
    work = [(idx + 1).sum() for idx in order]  # keys seen per device under plain causal attention
    assert max(work) == min(work)
    assert sorted(order.ravel().tolist()) == list(range(64))


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_sequence_parallel_equals_single_device():
    rng = np.random.default_rng(0)
    seg, pos = _packed(T, rng)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (1, T, K, G, H), jnp.float32)
    k = jax.random.normal(kk, (1, T, K, H), jnp.float32)
    v = jax.random.normal(kv, (1, T, K, H), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (1, T, K, G, H), jnp.float32)

    def ref_loss(q, k, v):
        mask = attention_mask(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(seg), False)
        return jnp.sum(reference_attention(q, k, v, mask) * w), reference_attention(q, k, v, mask)

    (_, ref_out), ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    mesh = make_mesh(MeshConfig(data=1, sequence=8))
    perm = zigzag_order(T, 8)
    inv = np.argsort(perm)

    def sp_loss(q, k, v):
        out = sequence_parallel_attention(q[:, perm], k[:, perm], v[:, perm], jnp.asarray(pos[:, perm]),
                                          jnp.asarray(seg[:, perm]), mesh=mesh, block=256)
        out = out[:, inv]
        return jnp.sum(out * w), out

    (_, sp_out), sp_grads = jax.jit(jax.value_and_grad(sp_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(sp_out), np.asarray(ref_out), atol=2e-5, rtol=1e-5)
    for a, b in zip(sp_grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_model_forward_with_sequence_axis_equals_one_device():
    import internlm_jax as ij

    cfg = ij.get_preset("internlm2-tiny")
    params = ij.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    seg, pos = _packed(512, rng)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 512)), jnp.int32)
    want, _ = ij.forward(params, tokens, jnp.asarray(pos), config=cfg, segment_ids=jnp.asarray(seg))
    mesh = make_mesh(MeshConfig(data=1, sequence=4, tensor=2))
    perm = zigzag_order(512, 4)
    with ij.use_mesh(mesh):
        got, _ = jax.jit(lambda p, t, q, s: ij.forward(p, t, q, config=cfg, segment_ids=s))(
            params, tokens[:, perm], jnp.asarray(pos[:, perm]), jnp.asarray(seg[:, perm]))
    np.testing.assert_allclose(np.asarray(got)[:, np.argsort(perm)], np.asarray(want), atol=1e-5)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_sequence_parallel_prefill_into_pages_equals_one_device():
    """A long prompt prefilled with its tokens sharded over 8 devices (sequence axis; attention all-gathers
    K/V inside the block) into an empty paged cache gives the one-device logits, and the greedy tokens decoded
    after it from those pages are the one-device ones. Dynamic NTK at 4x max_position_embeddings."""
    from internlm_jax.config import get_preset
    from internlm_jax.kv_cache import init_paged_cache
    from internlm_jax.model import forward, init_params
    from internlm_jax.sharding import use_mesh

    cfg = get_preset("internlm2-tiny", max_position_embeddings=256, rope_scaling=("dynamic", 2.0))
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(4))
    T, page, new = 1024, 16, 5
    toks = jax.random.randint(jax.random.key(5), (1, T), 3, cfg.vocab_size)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    pages = (T + new) // page + 1

    def empty():
        c = init_paged_cache(cfg, pages, page, batch=1, max_pages_per_seq=pages)
        return c.with_rows(jnp.arange(pages, dtype=jnp.int32)[None], jnp.zeros((1,), jnp.int32))

    prefill = jax.jit(lambda p, t, q, c, fresh: forward(p, t, q, config=cfg, cache=c, fresh=fresh),
                      static_argnames="fresh")
    decode = jax.jit(lambda p, t, c: forward(p, t, config=cfg, cache=c))

    def greedy(logits, cache):
        out, tok = [], jnp.argmax(logits[:, -1], -1)[:, None]
        for _ in range(new):
            out.append(int(tok[0, 0]))
            logits, cache = decode(params, tok, cache)
            tok = jnp.argmax(logits[:, -1], -1)[:, None]
        return out

    ref_logits, ref_cache = prefill(params, toks, pos, empty(), False)  # one device, attention over the pages
    mesh = make_mesh(MeshConfig(data=1, sequence=8))
    with use_mesh(mesh):
        sp_logits, sp_cache = prefill(params, toks, pos, empty(), True)
    np.testing.assert_allclose(np.asarray(sp_logits), np.asarray(ref_logits), atol=1e-4)
    assert int(sp_cache.lengths[0]) == T
    assert greedy(sp_logits, sp_cache) == greedy(ref_logits, ref_cache)
