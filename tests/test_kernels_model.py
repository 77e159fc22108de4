"""The model with attention_impl="pallas" (flash kernel, interpreted on CPU) gives the same logits and gradients
as attention_impl="reference" on internlm2-tiny, for packed sequences (segment ids, restarting positions)."""

from __future__ import annotations

import pytest
import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import get_preset
from internlm_jax.model import forward, init_params


def _batch(config, B=2, T=24, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (B, T)), jnp.int32)
    segments = np.zeros((B, T), np.int32)
    segments[0, 9:] = 1
    segments[0, 17:] = 2
    segments[1, 13:] = 1
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        for t in range(1, T):
            positions[b, t] = 0 if segments[b, t] != segments[b, t - 1] else positions[b, t - 1] + 1
    return tokens, jnp.asarray(positions), jnp.asarray(segments)


def _loss_and_grads(config, params, tokens, positions, segments):
    def loss(p):
        logits, _ = forward(p, tokens, positions, config=config, segment_ids=segments)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll), logits

    (val, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return val, logits, grads


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_pallas_attention_matches_reference_logits_and_grads(monkeypatch):
    from internlm_jax import kernels

    calls = []
    real = kernels.flash_attention_dispatch
    monkeypatch.setattr(kernels, "flash_attention_dispatch", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref_cfg = get_preset("internlm2-tiny", attention_impl="reference")
    pal_cfg = get_preset("internlm2-tiny", attention_impl="pallas")
    params = init_params(ref_cfg, jax.random.PRNGKey(0))
    batch = _batch(ref_cfg)
    v_ref, l_ref, g_ref = _loss_and_grads(ref_cfg, params, *batch)
    v_pal, l_pal, g_pal = _loss_and_grads(pal_cfg, params, *batch)
    np.testing.assert_allclose(l_pal, l_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(v_pal, v_ref, atol=1e-6, rtol=1e-6)
    flat_ref = jax.tree_util.tree_leaves_with_path(g_ref)
    flat_pal = jax.tree.leaves(g_pal)
    for (path, a), b in zip(flat_ref, flat_pal):
        scale = max(float(jnp.max(jnp.abs(a))), 1e-6)
        np.testing.assert_allclose(b, a, atol=2e-5 * scale, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    assert calls, "attention_impl='pallas' did not reach the flash kernel"


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_dispatch_runs_per_shard_under_a_mesh():
    """Under sharding.use_mesh the kernels run per shard (batch over data, kv heads over tensor), with the
    same result as without a mesh."""
    from kernel_cases import _inputs, _segments
    from test_kernels_paged import make_case

    from internlm_jax.kernels import flash_attention_dispatch, paged_attention_dispatch
    from internlm_jax.sharding import MeshConfig, make_mesh, use_mesh

    mesh = make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
    q, k, v, _ = _inputs(2, 20, 20, 2, 2, 16, jnp.float32)
    seg = _segments(2, 20)
    def flash():  # a fresh jit per use: the active mesh is read at trace time
        return jax.jit(lambda q, k, v, s: flash_attention_dispatch(q, k, v, s, impl="pallas"))

    plain = flash()(q, k, v, seg)
    with use_mesh(mesh):
        lowered = flash().lower(q, k, v, seg)
        sharded = lowered.compile()(q, k, v, seg)
    assert "manual_computation" in lowered.as_text()  # shard_map: each device runs the kernel on its shard
    np.testing.assert_allclose(sharded, plain, atol=1e-6)

    case = make_case([30, 7], T=1, K=2, G=2, H=16)
    args = [case[n] for n in ("q", "k_pages", "v_pages", "page_table", "lengths", "q_positions")]
    def paged():
        return jax.jit(lambda *a: paged_attention_dispatch(*a, impl="pallas", interpret=True))

    plain = paged()(*args)
    with use_mesh(mesh):
        sharded = paged()(*args)
    np.testing.assert_allclose(sharded, plain, atol=1e-6)
