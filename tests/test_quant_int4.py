"""Int4 weight quantization: QuantizedLinear numerics, RTN and AWQ on a briefly trained tiny model (accuracy
reported), AWQ vs RTN on a layer with outlier channels, exact folding, save/load, the CLI, and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import internlm_jax as ij
from internlm_jax.api import LM
from internlm_jax.config import ConfigError, get_preset
from internlm_jax.model import forward, param_shapes
from internlm_jax.quant import (
    QuantizedLinear,
    accuracy_report,
    format_report,
    load_quantized,
    params_nbytes,
    perplexity,
    quantize_params,
    quantize_weight,
    quantized_param_axes,
    save_quantized,
    top1_agreement,
)
from internlm_jax.quant.awq import fold_scales, search_scale
from kernels_pallas.int4_matmul import dequantize_int4, quantize_int4

CFG = get_preset("internlm2-tiny", vocab_size=256)
GROUP = 32


def random_params(config, seed: int = 0):
    """Random weights built on the host (std 0.02, norms near 1): no XLA compile, unlike init_params."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.asarray(1.0 + 0.1 * rng.normal(size=shape), jnp.float32)
        return jnp.asarray(0.02 * rng.normal(size=shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def _bigram_batch(rng: np.random.Generator, perm: np.ndarray, b: int, t: int, noise: float = 0.1) -> np.ndarray:
    """Rows that follow next = perm[cur], with a fraction `noise` of random tokens: a learnable, not trivial LM."""
    x = np.empty((b, t), np.int32)
    x[:, 0] = rng.integers(0, CFG.vocab_size, b)
    for j in range(1, t):
        rand = rng.integers(0, CFG.vocab_size, b)
        x[:, j] = np.where(rng.random(b) < noise, rand, perm[x[:, j - 1]])
    return x


@pytest.fixture(scope="module")
def trained():
    """A tiny InternLM2 trained for a few hundred steps on bigram data, plus held-out and calibration rows."""
    rng = np.random.default_rng(0)
    perm = rng.permutation(CFG.vocab_size)
    params = random_params(CFG)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x):
        def loss(p):
            logits, _ = forward(p, x[:, :-1], config=CFG)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]))
        l, g = jax.value_and_grad(loss)(params)
        up, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, up), opt, l

    for _ in range(300):
        params, opt, l = step(params, opt, jnp.asarray(_bigram_batch(rng, perm, 16, 33)))
    heldout = _bigram_batch(np.random.default_rng(1), perm, 8, 32)
    calib = _bigram_batch(np.random.default_rng(2), perm, 16, 32)
    return {"params": params, "loss": float(l), "heldout": heldout, "calib": calib}


_fwd = jax.jit(forward, static_argnames="config")


def _logits(params, tokens):
    return _fwd(params, jnp.asarray(tokens), config=CFG)[0]


def test_quantized_linear_equals_dense_dequantized_weight():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(2, 2, 2, 16, 64)), jnp.float32)  # [L, K, G, H, D] like wo, 3 input dims
    q = quantize_weight(w, in_ndim=3, lead_ndim=1, group_size=GROUP)
    assert q.shape == w.shape and q.weight.packed.dtype == jnp.uint8
    dense = q.dequantize()
    for layer in range(2):  # the stacked (vmapped) quantization is the kernel module's, matrix by matrix
        one_layer = quantize_int4(w[layer], GROUP, symmetric=False, in_ndim=3)
        np.testing.assert_array_equal(np.asarray(dense[layer]), np.asarray(dequantize_int4(one_layer)))
    # Asymmetric RTN: error at most half a step, a step being (group range) / 15 <= 2 max|w| / 15.
    assert float(jnp.max(jnp.abs(dense - w))) <= float(jnp.max(jnp.abs(w))) / 15 * (1 + 1e-6)
    x = jnp.asarray(rng.normal(size=(3, 5, 2, 2, 16)), jnp.float32)
    one = jax.tree.map(lambda a: a[1], q)
    got = one.linear(x, "KGH", "D", jnp.float32)
    want = jnp.einsum("BTKGH,KGHD->BTD", x, dense[1], precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stack"):
        q.linear(x, "KGH", "D", jnp.float32)
    with pytest.raises(ValueError, match="used as"):
        one.linear(x, "D", "D", jnp.float32)


def test_int4_gradient_reaches_activations_only():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    q = quantize_weight(w, in_ndim=1, group_size=GROUP, impl="reference")
    x = jnp.asarray(rng.normal(size=(4, 64)), jnp.float32)
    dense = q.dequantize()
    gx = jax.grad(lambda x: jnp.sum(jnp.sin(q.linear(x, "D", "F", jnp.float32))))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.dot(x, dense, precision="highest"))))(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_pallas_kernel_path_matches_reference():
    """impl="pallas" runs the int4 kernel (interpret mode on CPU), forward and backward (the custom VJP)."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(64, 2, 4, 16)), jnp.float32)  # wqkv-shaped [D, K, G+2, H]
    kern = quantize_weight(w, in_ndim=1, group_size=GROUP, impl="pallas")
    ref = kern.replace(impl="reference")
    x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
    np.testing.assert_allclose(np.asarray(kern.linear(x, "D", "KQH", jnp.float32)),
                               np.asarray(ref.linear(x, "D", "KQH", jnp.float32)), rtol=1e-5, atol=1e-4)
    loss = lambda q: (lambda x: jnp.sum(q.linear(x, "D", "KQH", jnp.float32) ** 2))
    np.testing.assert_allclose(np.asarray(jax.grad(loss(kern))(x)), np.asarray(jax.grad(loss(ref))(x)),
                               rtol=1e-5, atol=1e-3)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_quantized_params_shard_over_a_mesh(trained):
    from internlm_jax.sharding import MeshConfig, make_mesh, tree_shardings, use_mesh

    q = quantize_params(trained["params"], CFG, group_size=GROUP, targets=("wqkv", "wo", "w1", "w2", "w3", "output"))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(q, tree_shardings(mesh, quantized_param_axes(q, CFG), q))
    assert tuple(sharded["layers"]["wqkv"].weight.packed.sharding.spec) == (None, "fsdp", "tensor")
    assert tuple(sharded["layers"]["wo"].weight.scales.sharding.spec) == (None, "tensor", "fsdp")
    x = trained["heldout"][:4]
    with use_mesh(mesh):
        got = _fwd(sharded, jnp.asarray(x), config=CFG)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(_logits(q, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_rtn_accuracy_on_trained_tiny_model(trained):
    params = trained["params"]
    q = quantize_params(params, CFG, group_size=GROUP)
    for name in ("wqkv", "wo", "w1", "w2", "w3"):
        assert isinstance(q["layers"][name], QuantizedLinear)
        assert q["layers"][name].weight.packed.dtype == jnp.uint8
    before, after = params_nbytes(params), params_nbytes(q)
    rep = accuracy_report(LM(CFG, params), LM(CFG, q), trained["heldout"], steps=16)
    print(f"\ntrained tiny (train loss {trained['loss']:.3f}), RTN int4 g{GROUP}: {format_report(rep)}; "
          f"params {before} -> {after} bytes")
    assert rep["ppl_ref"] < 4.0, "the fixture model did not learn the bigram data"
    assert 1.0 - 1e-3 < rep["ppl_ratio"] < 1.05
    assert rep["top1_agreement"] >= 0.95
    assert rep["greedy_agreement"] >= 0.9
    # The layer matmuls shrink to int4 (+ fp32 scales and zeros per group of 32): 4 + 2 * 32 / 32 bits.
    layer_before = sum(params["layers"][n].nbytes for n in ("wqkv", "wo", "w1", "w2", "w3"))
    layer_after = sum(q["layers"][n].nbytes for n in ("wqkv", "wo", "w1", "w2", "w3"))
    assert layer_after * 32 == layer_before * 6


def test_awq_beats_rtn_on_layer_with_outlier_channels():
    rng = np.random.default_rng(0)
    din, dout = 256, 128
    gain = np.ones(din, np.float32)
    gain[rng.choice(din, 8, replace=False)] = 30.0  # a few activation channels 30x louder than the rest
    x_cal = jnp.asarray(rng.normal(size=(512, din)) * gain, jnp.float32)
    x_val = jnp.asarray(rng.normal(size=(512, din)) * gain, jnp.float32)
    w = jnp.asarray(rng.normal(size=(din, dout)) * 0.05, jnp.float32)
    alpha, s, errs = search_scale(x_cal, (w,), jnp.mean(jnp.abs(x_cal), 0), group_size=64, zero_point=True)

    def err(q):
        return float(jnp.mean((x_val @ q - x_val @ w) ** 2))
    rtn = err(dequantize_int4(quantize_int4(w, 64, symmetric=False)))
    awq = err(dequantize_int4(quantize_int4(w * s[:, None], 64, symmetric=False)) / s[:, None])
    print(f"\noutlier layer: alpha={float(alpha):.2f}, held-out output MSE RTN {rtn:.3e} -> AWQ {awq:.3e}")
    assert float(errs[0]) == pytest.approx(float(jnp.mean((x_cal @ dequantize_int4(
        quantize_int4(w, 64, symmetric=False)) - x_cal @ w) ** 2)), rel=1e-5)  # grid point 0 is plain RTN
    assert float(alpha) > 0.0
    assert awq < 0.7 * rtn


def test_fold_scales_is_exact_in_full_precision(trained):
    params = trained["params"]
    L, K, G, H = CFG.num_layers, CFG.num_kv_heads, CFG.groups, CFG.head_dim
    r = np.random.default_rng(3)
    u = lambda *shape: jnp.asarray(r.uniform(0.5, 2.0, shape), jnp.float32)
    scales = {"wqkv": u(L, CFG.hidden_size), "wo": jnp.repeat(u(L, K, 1, H), G, axis=2).reshape(L, -1),
              "w1_w3": u(L, CFG.hidden_size), "w2": u(L, CFG.intermediate_size)}
    folded = fold_scales(params, CFG, scales, u(CFG.hidden_size))
    assert not np.allclose(np.asarray(folded["layers"]["wqkv"]), np.asarray(params["layers"]["wqkv"]))
    x = trained["heldout"][:4]
    np.testing.assert_allclose(np.asarray(_logits(folded, x)), np.asarray(_logits(params, x)), atol=1e-5)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_awq_model_quantization(trained, tmp_path):
    params = trained["params"]
    targets = ("wqkv", "wo", "w1", "w2", "w3", "output")
    awq, info = quantize_params(params, CFG, group_size=GROUP, method="awq", calib_batches=trained["calib"],
                                targets=targets, return_info=True)
    rtn = quantize_params(params, CFG, group_size=GROUP, targets=targets)
    assert set(info["alphas"]) == {"wqkv", "wo", "w1_w3", "w2", "output"}
    assert all(len(v) == CFG.num_layers for k, v in info["alphas"].items() if k != "output")
    for errs in info["errors"].values():
        for rtn_err, awq_err in errs:
            assert awq_err <= rtn_err
    assert isinstance(awq["output"], QuantizedLinear)
    ref, held = LM(CFG, params), trained["heldout"]
    ppl_ref, ppl_awq, ppl_rtn = perplexity(ref, held), perplexity(LM(CFG, awq), held), perplexity(LM(CFG, rtn), held)
    top1 = top1_agreement(ref, LM(CFG, awq), held)
    print(f"\nAWQ alphas {info['alphas']}\nwith the head quantized too: perplexity {ppl_ref:.4f} -> RTN "
          f"{ppl_rtn:.4f} / AWQ {ppl_awq:.4f}; AWQ top-1 agreement {top1:.3f}")
    assert ppl_awq / ppl_ref < 1.05 and top1 >= 0.95

    # Save / load: the same tree, the same logits, the info kept.
    save_quantized(tmp_path / "q", awq, CFG, info)
    cfg2, loaded, info2 = load_quantized(tmp_path / "q")
    assert cfg2 == CFG and info2["alphas"] == info["alphas"]
    assert jax.tree.structure(loaded) == jax.tree.structure(awq)
    x = trained["heldout"]
    np.testing.assert_array_equal(np.asarray(_logits(loaded, x)), np.asarray(_logits(awq, x)))
    lm = ij.load(tmp_path / "q")  # the one loader opens int4 folders
    np.testing.assert_array_equal(lm.logits(x[0].tolist()), np.asarray(_logits(awq, x[:1]))[0])
    with pytest.raises(ConfigError, match="already exists"):
        save_quantized(tmp_path / "q", awq, CFG, info)


@pytest.mark.slow
def test_cli_quantize(tmp_path, capsys):
    from internlm_jax.quant.cli import main

    rows = np.random.default_rng(0).integers(0, 1024, (40, 16))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in rows))
    out = tmp_path / "tiny-awq"
    rc = main(["--model", "internlm2-tiny", "--out", str(out), "--method", "awq", "--group-size", "32",
               "--calib", str(calib), "--calib-samples", "8", "--calib-seqlen", "32", "--eval", str(calib),
               "--eval-rows", "2", "--eval-seqlen", "16", "--quiet"])
    text = capsys.readouterr().out
    print(text)
    assert rc == 0
    assert "MiB ->" in text and "AWQ scales" in text and "greedy agreement" in text
    _, params, info = load_quantized(out)
    assert info["method"] == "awq" and isinstance(params["layers"]["w2"], QuantizedLinear)
    # Errors come back as exit code 2 with a message, not a traceback.
    assert main(["--model", "internlm2-tiny", "--out", str(tmp_path / "x"), "--method", "awq"]) == 2
    assert "--calib" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\nnot json\n')
    assert main(["--model", "internlm2-tiny", "--out", str(tmp_path / "y"), "--method", "awq", "--calib",
                 str(bad), "--group-size", "32"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_bad_inputs(trained, tmp_path):
    params = trained["params"]
    with pytest.raises(ConfigError, match="group_size 128 does not divide.*valid here: \\[32, 64\\]"):
        quantize_params(params, CFG)  # tiny model: D = 64
    with pytest.raises(ConfigError, match="unknown targets \\['wq'\\].*wqkv, wo, w1, w3, w2, output"):
        quantize_params(params, CFG, group_size=GROUP, targets=("wq",))
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_params(params, CFG, group_size=GROUP, method="awq")
    with pytest.raises(ConfigError, match="rtn' or 'awq"):
        quantize_params(params, CFG, group_size=GROUP, method="gptq")
    q = quantize_params(params, CFG, group_size=GROUP, targets=("w2",))
    with pytest.raises(ConfigError, match="not a dense array"):
        quantize_params(q, CFG, group_size=GROUP, targets=("w2",))
    with pytest.raises(ConfigError, match="token ids must be in"):
        quantize_params(params, CFG, group_size=GROUP, method="awq", calib_batches=np.full((2, 8), 999))
    with pytest.raises(ConfigError, match="not a quantized internlm-jax checkpoint"):
        load_quantized(tmp_path)
