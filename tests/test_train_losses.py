"""The fused output head + cross-entropy (train/losses.py) against the unfused reference: values and gradients
(hidden states, head weight, loss weights), zero-weight tokens, chunks that do not divide T, bf16, LoRA and
int4 heads, no [B, T, V] array in the graph, and the train step / DPO log-probs unchanged by the fusion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm_jax.config import get_preset
from internlm_jax.model import init_params, param_axes
from internlm_jax.sharding import MeshConfig, make_mesh
from internlm_jax.train.losses import (
    generic_token_ce,
    head_ce_sums,
    head_token_ce,
    head_weight,
    output_ce_sums,
    reference_ce_sums,
    reference_token_ce,
)
from internlm_jax.train.optimizer import trainable_mask
from internlm_jax.train.step import (
    abstract_state,
    default_loss_fn,
    init_state,
    lm_loss,
    make_step_fns,
    put_batch,
)
from internlm_jax.train.synthetic import SyntheticBatches

B, T, D, V = 2, 13, 16, 37
# (value rtol, grad atol relative to the largest gradient entry) per matmul input dtype
TOL = {"float32": (2e-6, 2e-6), "bfloat16": (2e-2, 3e-2)}


def _inputs(dtype="float32", seed=0, frac_weights=False):
    k = jax.random.split(jax.random.key(seed), 4)
    h = (jax.random.normal(k[0], (B, T, D), jnp.float32) * 2.0).astype(dtype)
    w = (jax.random.normal(k[1], (D, V), jnp.float32) / np.sqrt(D) * 3.0).astype(dtype)
    targets = jax.random.randint(k[2], (B, T), 0, V)
    targets = targets.at[0, -3:].set(-1).at[1, 0].set(-1)  # padding targets (weight 0 below)
    weights = (targets >= 0).astype(jnp.float32) * (jax.random.uniform(k[3], (B, T)) > 0.25)
    if frac_weights:
        weights = weights * jax.random.uniform(k[3], (B, T), minval=0.5, maxval=2.0)
    assert 0 < float(weights.sum()) < B * T
    return h, w, targets, weights


def _close(got, want, rtol, name):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [0, 4, 5, 13, 64])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_sums_match_reference_values_and_grads(dtype, chunk, z_loss):
    h, w, targets, weights = _inputs(dtype, frac_weights=True)
    vtol, gtol = TOL[dtype]

    def fused(h, w, m):
        return head_ce_sums(h, w, targets, m, z_loss=z_loss, chunk=chunk, dtype=dtype)

    def ref(h, w, m):
        return reference_ce_sums(h, w, targets, m, z_loss=z_loss, dtype=dtype)

    got, want = jax.jit(fused)(h, w, weights), jax.jit(ref)(h, w, weights)
    for name, a, b in zip(("objective", "ce_sum", "z_sum"), got, want):
        np.testing.assert_allclose(float(a), float(b), rtol=vtol, err_msg=name)
    g_got = jax.jit(jax.grad(lambda *a: fused(*a)[0], argnums=(0, 1, 2)))(h, w, weights)
    g_want = jax.jit(jax.grad(lambda *a: ref(*a)[0], argnums=(0, 1, 2)))(h, w, weights)
    for name, a, b in zip(("dh", "dw", "dweights"), g_got, g_want):
        assert a.dtype == b.dtype, name
        _close(a, b, gtol, name)
    # zero-weight tokens get exactly zero hidden-state gradient
    dh = np.asarray(g_got[0], np.float32)
    assert np.all(dh[np.asarray(weights) == 0] == 0)
    assert np.abs(dh[np.asarray(weights) > 0]).max() > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [0, 3, 13])
def test_token_values_match_reference_with_any_cotangents(dtype, chunk):
    h, w, targets, _ = _inputs(dtype, seed=1)
    vtol, gtol = TOL[dtype]
    fused = jax.jit(lambda h, w: head_token_ce(h, w, targets, chunk=chunk, dtype=dtype))
    ref = jax.jit(lambda h, w: reference_token_ce(h, w, targets, dtype=dtype))
    for name, a, b in zip(("ce", "lse"), fused(h, w), ref(h, w)):
        _close(a, b, vtol * 10, name)
    k1, k2 = jax.random.split(jax.random.key(7))
    cts = (jax.random.normal(k1, (B, T)), jax.random.normal(k2, (B, T)))
    g_got = jax.vjp(fused, h, w)[1](cts)
    g_want = jax.vjp(ref, h, w)[1](cts)
    for name, a, b in zip(("dh", "dw"), g_got, g_want):
        assert a.dtype == b.dtype, name
        _close(a, b, gtol, name)


def test_generic_path_matches_reference_and_no_grad_evaluation():
    h, w, targets, weights = _inputs()
    for chunk in (0, 5):
        ce, lse = generic_token_ce(h, w, targets, chunk=chunk)
        rce, rlse = reference_token_ce(h, w, targets)
        _close(ce, rce, 1e-6, "ce")
        _close(lse, rlse, 1e-6, "lse")
    # the primal (no differentiation) path of the fused sums equals its forward-with-gradients path
    plain = jax.jit(lambda h, w: head_ce_sums(h, w, targets, weights, z_loss=0.1, chunk=4))(h, w)
    with_grad, _ = jax.jit(jax.value_and_grad(lambda h, w: head_ce_sums(h, w, targets, weights, z_loss=0.1,
                                                                         chunk=4)[0]))(h, w)
    np.testing.assert_allclose(float(with_grad), float(plain[0]), rtol=1e-6)


def _max_intermediate(jaxpr) -> int:
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, int(np.prod(getattr(v.aval, "shape", ()) or (1,))))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    best = max(best, _max_intermediate(getattr(inner, "jaxpr", inner)))
    return best


def test_no_full_logits_in_forward_or_backward():
    Bb, Tb, Db, Vb = 2, 64, 8, 1000
    h = jnp.ones((Bb, Tb, Db))
    w = jnp.ones((Db, Vb))
    targets = jnp.zeros((Bb, Tb), jnp.int32)
    m = jnp.ones((Bb, Tb))
    grad = jax.grad(lambda h, w: head_ce_sums(h, w, targets, m, chunk=8)[0], argnums=(0, 1))
    tok = jax.grad(lambda h, w: jnp.sum(head_token_ce(h, w, targets, chunk=8)[0]), argnums=(0, 1))
    for fn in (grad, tok):
        biggest = _max_intermediate(jax.make_jaxpr(fn)(h, w).jaxpr)
        assert biggest == Bb * 8 * Vb, biggest  # one chunk's logits, never [B, T, V]
    # the reference does hold them (so the measure above can see a [B, T, V] array)
    ref = jax.grad(lambda h, w: reference_ce_sums(h, w, targets, m)[0], argnums=(0, 1))
    assert _max_intermediate(jax.make_jaxpr(ref)(h, w).jaxpr) >= Bb * Tb * Vb


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_lora_head_is_merged_and_int4_or_dropout_fall_back():
    from internlm_jax.peft import LoraWeight
    from internlm_jax.quant.int4 import quantize_weight

    h, w, targets, weights = _inputs(seed=2)
    k1, k2 = jax.random.split(jax.random.key(3))
    lora = LoraWeight(base=w, a=jax.random.normal(k1, (D, 4)) * 0.3, b=jax.random.normal(k2, (4, V)) * 0.3,
                      alpha=8.0)
    assert head_weight(lora) is not None

    def loss(a, b, fused):
        lw = LoraWeight(base=w, a=a, b=b, alpha=8.0)
        return output_ce_sums(h, lw, targets, weights, z_loss=0.01, chunk=5, fused=fused)[0]

    v1, g1 = jax.value_and_grad(loss, argnums=(0, 1))(lora.a, lora.b, True)
    v0, g0 = jax.value_and_grad(loss, argnums=(0, 1))(lora.a, lora.b, False)
    np.testing.assert_allclose(float(v1), float(v0), rtol=2e-6)
    for name, a, b in zip(("da", "db"), g1, g0):
        _close(a, b, 1e-5, name)
    dropped = LoraWeight(base=w, a=lora.a, b=lora.b, dropout_key=jax.random.key(0), alpha=8.0, dropout=0.1)
    assert head_weight(dropped) is None
    q = quantize_weight(jnp.pad(w, ((0, 128 - D), (0, 0))), 1, group_size=128)
    assert head_weight(q) is None
    hq = jnp.pad(h, ((0, 0), (0, 0), (0, 128 - D)))
    got = output_ce_sums(hq, q, targets, weights, chunk=5)
    want = reference_ce_sums(hq, q.dequantize(jnp.float32), targets, weights)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-4)


# ---- the model losses ------------------------------------------------------------------------------------
CFG = get_preset("internlm2-tiny")


def _batch(rows=4, seq=32):
    return {k: jnp.asarray(v) for k, v in next(SyntheticBatches(CFG.vocab_size, seq, rows, seed=5)).items()}


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
@pytest.mark.parametrize("chunk", [0, 7])
def test_lm_loss_fused_equals_unfused(chunk):
    params = init_params(CFG, jax.random.key(1))
    batch = _batch()

    def f(p, fused):
        n, d, aux = lm_loss(p, batch, CFG, z_loss=1e-3, chunk=chunk, fused=fused)
        return n / d, aux

    vg = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)
    (v1, a1), g1 = vg(params, True)
    (v0, a0), g0 = vg(params, False)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for k in ("ce_sum", "z_sum"):
        np.testing.assert_allclose(float(a1[k]), float(a0[k]), rtol=1e-6, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g1)):
        _close(b, a, 2e-5, jax.tree_util.keystr(path))


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_train_step_losses_and_updates_equal_before_and_after_fusion():
    tx = optax.sgd(1.0)  # params move by exactly minus the gradient
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    init = lambda k: init_params(CFG, k)
    abstract, mask = abstract_state(CFG, tx, lambda p: trainable_mask(p, None), init)
    batch = next(SyntheticBatches(CFG.vocab_size, 32, 8, seed=9))
    out = {}
    for fused in (False, True):
        fns = make_step_fns(CFG, tx, lambda s: 1.0, mesh, abstract, param_axes(CFG), mask, grad_accum=2,
                            loss_fn=default_loss_fn(z_loss=1e-4, chunk=0, fused=fused), donate=False)
        state = jax.jit(lambda k: init_state(init(k), tx, mask), out_shardings=fns.shardings)(jax.random.key(0))
        s1, m1 = fns.train(state, put_batch(batch, fns.batch_sharding))
        s2, m2 = fns.train(s1, put_batch(batch, fns.batch_sharding))
        out[fused] = (state, s2, m1, m2)
    _, s_old, m1_old, m2_old = out[False]
    _, s_new, m1_new, m2_new = out[True]
    for key in ("loss", "z_loss", "objective", "grad_norm", "tokens"):
        for a, b in ((m1_old, m1_new), (m2_old, m2_new)):
            np.testing.assert_allclose(float(b[key]), float(a[key]), rtol=1e-5, err_msg=key)
    assert float(m2_new["loss"]) < float(m1_new["loss"])  # the update moved the loss
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s_old["params"])[0], jax.tree.leaves(s_new["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_dpo_token_logps_fused_equals_generic():
    from internlm_jax.train.dpo import token_logps

    params = init_params(CFG, jax.random.key(2))
    batch = _batch(rows=2, seq=24)
    cot = jax.random.normal(jax.random.key(4), batch["tokens"].shape)

    def f(p, fused):
        return jnp.sum(token_logps(p, batch, CFG, chunk=5, fused=fused) * cot)

    vg = jax.jit(jax.value_and_grad(f), static_argnums=1)
    v1, g1 = vg(params, True)
    v0, g0 = vg(params, False)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g1)):
        _close(b, a, 2e-5, jax.tree_util.keystr(path))
