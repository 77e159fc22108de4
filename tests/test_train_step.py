"""The train step: gradient accumulation, chunked loss, masks, schedules (tiny model, one device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm_jax.config import get_preset
from internlm_jax.model import init_params, param_axes
from internlm_jax.sharding import MeshConfig, make_mesh
from internlm_jax.train.config import OptimizerConfig
from internlm_jax.train.optimizer import build_optimizer, decay_mask, make_schedule, trainable_mask
from internlm_jax.train.step import abstract_state, init_state, lm_loss, make_step_fns, put_batch
from internlm_jax.train.synthetic import SyntheticBatches

CFG = get_preset("internlm2-tiny")


def _setup(tx, grad_accum=1, trainable=None, schedule=None, cfg=CFG):
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    init = lambda k: init_params(cfg, k)
    abstract, mask = abstract_state(cfg, tx, lambda p: trainable_mask(p, trainable), init)
    fns = make_step_fns(cfg, tx, schedule or (lambda s: 1.0), mesh, abstract, param_axes(cfg), mask,
                        grad_accum=grad_accum, donate=False)
    state = jax.jit(lambda k: init_state(init(k), tx, mask), out_shardings=fns.shardings)(jax.random.key(0))
    return fns, state


def _batch(rows=8, seq=32, step=0):
    src = SyntheticBatches(CFG.vocab_size, seq, rows, seed=3)
    src.set_state({"step": step, "seed": 3})
    return next(src)


@pytest.fixture(scope="module")
def big_batch_step():
    # SGD with lr 1 makes each param update exactly minus the gradient, so params compare the gradients.
    tx = optax.sgd(1.0)
    big, state0 = _setup(tx, grad_accum=1)
    batch = _batch(rows=8)
    s1, m1 = big.train(state0, put_batch(batch, big.batch_sharding))
    return tx, batch, state0, s1, m1


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_grad_accumulation_equals_big_batch(big_batch_step):
    k = 4
    tx, batch, state0, s1, m1 = big_batch_step
    acc, _ = _setup(tx, grad_accum=k)
    s2, m2 = acc.train(state0, put_batch(batch, acc.batch_sharding))
    for key in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=2e-6, err_msg=key)
    g1 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state0["params"], s1["params"])
    g2 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state0["params"], s2["params"])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2)):
        scale = float(np.abs(a).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, atol=1e-5 * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_micro_batches_differ_so_accumulation_is_not_trivial():
    # Guard for the test above: the micro-batches really hold different rows (so k > 1 is not k copies).
    batch = _batch(rows=8)
    assert not np.array_equal(batch["tokens"][0::2], batch["tokens"][1::2])


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_chunked_loss_matches_full():
    params = init_params(CFG, jax.random.key(1))
    batch = {k: jnp.asarray(v) for k, v in _batch(rows=2, seq=32).items()}

    def f(p, chunk):
        n, d, _ = lm_loss(p, batch, CFG, z_loss=1e-3, chunk=chunk)
        return n / d

    vg = jax.jit(jax.value_and_grad(f), static_argnums=1)
    full, g_full = vg(params, 0)
    chunked, g_chunk = vg(params, 8)
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-4)


def test_loss_ignores_masked_targets_and_counts_z_loss():
    params = init_params(CFG, jax.random.key(1))
    batch = {k: jnp.asarray(v) for k, v in _batch(rows=4, seq=64).items()}
    loss = jax.jit(lambda p, b: lm_loss(p, b, CFG, z_loss=0.5))
    n, d, aux = loss(params, batch)
    assert float(d) == float(batch["loss_mask"].sum()) < batch["loss_mask"].size  # some positions are masked
    np.testing.assert_allclose(float(n), float(aux["ce_sum"] + 0.5 * aux["z_sum"]), rtol=1e-6)
    scrambled = dict(batch, targets=jnp.where(batch["loss_mask"] > 0, batch["targets"], 7))
    n2, _, _ = loss(params, scrambled)
    assert float(n2) == float(n)
    # Mean CE of a random init is near ln(V).
    assert abs(float(aux["ce_sum"] / d) - np.log(CFG.vocab_size)) < 0.1


def test_frozen_leaves_get_no_state_and_do_not_move():
    tx, _ = build_optimizer(OptimizerConfig(lr=1e-2), 10)
    only_norms = lambda path, leaf: "norm" in path
    fns, state0 = _setup(tx, trainable=only_norms)
    s1, _ = fns.train(state0, put_batch(_batch(), fns.batch_sharding))
    moved = {jax.tree_util.keystr(p): not np.array_equal(np.asarray(a), np.asarray(b)) for (p, a), b in
             zip(jax.tree_util.tree_flatten_with_path(state0["params"])[0], jax.tree.leaves(s1["params"]))}
    assert moved == {k: ("norm" in k) for k in moved}, moved
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    adam = next(s for s in jax.tree.leaves(s1["opt_state"], is_leaf=is_adam) if is_adam(s))
    mu_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(adam.mu)[0]]
    assert sorted(mu_paths) == ["['layers']['attention_norm']", "['layers']['ffn_norm']", "['norm']"]


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_bf16_compute_keeps_fp32_master_weights_and_state(big_batch_step):
    _, batch, _, _, m_fp32 = big_batch_step
    tx, _ = build_optimizer(OptimizerConfig(lr=1e-5, mu_dtype="float32"), 10)
    fns, state0 = _setup(tx, cfg=CFG.replace(dtype="bfloat16", param_dtype="float32"))
    s1, m = fns.train(state0, put_batch(batch, fns.batch_sharding))
    assert {x.dtype for x in jax.tree.leaves(s1["params"])} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(s1["opt_state"]) if x.ndim} == {jnp.dtype("float32")}
    # bf16 matmuls (8-bit mantissa) move the loss of this random init only slightly.
    assert abs(float(m["loss"]) - float(m_fp32["loss"])) < 0.02
    # An Adam step of ~1e-5 is far below bf16 resolution next to weights of 0.02..1 (relative step 2^-8), so
    # bf16 storage would drop it; the fp32 master weights take it.
    moved = [np.mean(np.asarray(a) != np.asarray(b)) for a, b in
             zip(jax.tree.leaves(state0["params"]), jax.tree.leaves(s1["params"]))]
    assert min(moved) > 0.9, moved


def test_weight_decay_mask():
    shapes = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    m = decay_mask(shapes, decay_embeddings=False)
    assert m["embed"] is False and m["output"] is True and m["norm"] is False
    assert m["layers"]["attention_norm"] is False and m["layers"]["wqkv"] is True
    assert decay_mask(shapes, decay_embeddings=True)["embed"] is True


def test_schedules():
    cos = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 14)
    np.testing.assert_allclose([float(cos(s)) for s in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(float(cos(14)), 0.1, rtol=1e-5)
    assert float(cos(9)) == pytest.approx(0.55, rel=1e-5)  # halfway through the cosine
    wsd = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=2, schedule="wsd", wsd_decay_fraction=0.2,
                                        min_lr_ratio=0.0), 20)
    assert [float(wsd(s)) for s in (2, 10, 15, 16)] == [1.0, 1.0, 1.0, 1.0]
    assert float(wsd(18)) == pytest.approx(0.5) and float(wsd(20)) == pytest.approx(0.0, abs=1e-7)
    const = make_schedule(OptimizerConfig(lr=2.0, schedule="constant"), 5)
    assert float(const(0)) == float(const(100)) == 2.0


def test_synthetic_batches_layout():
    b = _batch(rows=4, seq=64)
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    assert all(v.shape == (4, 64) for v in b.values())
    # positions restart at each new segment; a target exists only inside a document.
    starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert np.all(pos[starts] == 0) and np.all(pos[~starts] > 0)
    assert np.all(b["targets"][:, :-1][mask[:, :-1] > 0] == b["tokens"][:, 1:][mask[:, :-1] > 0])
