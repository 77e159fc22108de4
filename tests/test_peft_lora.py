"""LoRA / QLoRA: exact base logits at init, merge equivalence, QLoRA int4 storage and gradient flow through
the trainable mask, adapter files (PEFT safetensors and orbax), the HF layout of PEFT tensors, dropout,
memory reports, and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm_jax.checkpoint.hf_layout import SPECS
from internlm_jax.checkpoint.safetensors_io import SafetensorsReader
from internlm_jax.config import ConfigError, get_preset
from internlm_jax.model import forward, param_shapes
from internlm_jax.peft import (
    LoraWeight,
    apply_lora,
    enable_dropout,
    format_memory_table,
    is_adapter_path,
    load_adapters,
    memory_comparison,
    merge_adapters,
    merge_lora,
    param_memory_report,
    save_adapters,
    split_adapters,
    trainable_mask,
)
from internlm_jax.quant import QuantizedLinear, quantize_params
from internlm_jax.train.optimizer import merge_trainable, trainable_view

CFG = get_preset("internlm2-tiny", vocab_size=256)
TARGETS = ("wqkv", "wo", "w1", "w2", "w3", "output")
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)).astype(np.int32)
_fwd = jax.jit(forward, static_argnames="config")


def random_params(config, seed: int = 0):
    """Random weights built on the host (std 0.02, norms near 1): no XLA compile, unlike init_params."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.asarray(1.0 + 0.1 * rng.normal(size=shape), jnp.float32)
        return jnp.asarray(0.02 * rng.normal(size=shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def _logits(params, tokens=TOKENS):
    return np.asarray(_fwd(params, jnp.asarray(tokens), config=CFG)[0])


@pytest.fixture(scope="module")
def base():
    return random_params(CFG)


def _randomize_b(params, seed, std=0.05):
    """Give every adapter a random B (as after training), keeping A. Host RNG: no compiles."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x.replace(b=jnp.asarray(std * rng.normal(size=x.b.shape), x.b.dtype))
                        if isinstance(x, LoraWeight) else x, params, is_leaf=lambda v: isinstance(v, LoraWeight))


def test_lora_init_is_exactly_the_base_and_merge_matches(base):
    lora = apply_lora(base, CFG, targets=TARGETS, rank=8, alpha=16, key=jax.random.key(1))
    w = lora["layers"]["wqkv"]
    assert isinstance(w, LoraWeight) and w.a.shape == (2, 64, 8) and w.b.shape == (2, 8, 2, 4, 16)
    assert lora["layers"]["wo"].a.shape == (2, 2, 2, 16, 8) and w.scale == 2.0
    ref = _logits(base)
    np.testing.assert_array_equal(_logits(lora), ref)  # B = 0: not one bit changes

    trained = _randomize_b(lora, 2)
    with_adapter = _logits(trained)
    assert np.max(np.abs(with_adapter - ref)) > 1e-2  # the adapters matter
    merged = merge_lora(trained)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(_logits(merged), with_adapter, rtol=0, atol=1e-5)


def test_split_merge_and_adapter_files_round_trip(base, tmp_path):
    lora = _randomize_b(apply_lora(base, CFG, targets=TARGETS, rank=4, alpha=8, key=jax.random.key(3)), 4)
    want = _logits(lora)
    plain, adapters = split_adapters(lora)
    assert jax.tree.structure(plain) == jax.tree.structure(base)
    assert set(adapters["layers"]) == {"wqkv", "wo", "w1", "w2", "w3"} and "output" in adapters
    np.testing.assert_array_equal(_logits(merge_adapters(plain, adapters)), want)

    save_adapters(tmp_path / "peft", lora, CFG, base_model_name_or_path="internlm/internlm2-tiny")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == sorted(TARGETS)
    reader = SafetensorsReader(tmp_path / "peft" / "adapter_model.safetensors")
    a_name = "base_model.model.model.layers.1.attention.wqkv.lora_A.weight"
    assert reader.tensors[a_name].shape == (4, 64)
    assert reader.tensors[a_name.replace("lora_A", "lora_B")].shape == (2 * 4 * 16, 4)
    assert reader.tensors["base_model.model.output.lora_B.weight"].shape == (256, 4)
    assert len(reader.tensors) == 2 * (5 * CFG.num_layers + 1)
    loaded = load_adapters(tmp_path / "peft", CFG)
    np.testing.assert_array_equal(_logits(merge_adapters(base, loaded)), want)

    save_adapters(tmp_path / "orbax", adapters, CFG, format="orbax")
    loaded = load_adapters(tmp_path / "orbax", CFG)
    np.testing.assert_array_equal(_logits(merge_adapters(base, loaded)), want)
    with pytest.raises(ConfigError, match="already exists"):
        save_adapters(tmp_path / "peft", lora, CFG)


def test_peft_tensors_follow_the_hf_layout(base, tmp_path):
    """What PEFT computes on the HF model, W_hf + (alpha / r) B @ A, is our merged weight in HF layout."""
    lora = _randomize_b(apply_lora(base, CFG, targets=TARGETS, rank=4, alpha=8, key=jax.random.key(5)), 6)
    save_adapters(tmp_path / "peft", lora, CFG)
    reader = SafetensorsReader(tmp_path / "peft" / "adapter_model.safetensors")
    merged = merge_lora(lora)
    specs = {s.path: s for s in SPECS}
    for name in TARGETS:
        if name == "output":
            spec, prefix = specs[("output",)], "base_model.model.output"
            w_ours, merged_ours = base["output"], merged["output"]
        else:  # check layer 1 of the stack
            spec = specs[("layers", name)]
            prefix = "base_model.model." + spec.hf_name.format(i=1).removesuffix(".weight")
            w_ours, merged_ours = base["layers"][name][1], merged["layers"][name][1]
        A = reader.read(prefix + ".lora_A.weight").astype(np.float64)
        B = reader.read(prefix + ".lora_B.weight").astype(np.float64)
        want = spec.to_hf(np.asarray(w_ours, np.float64), CFG) + 2.0 * B @ A
        got = spec.to_hf(np.asarray(merged_ours, np.float64), CFG)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_qlora_int4_base_and_gradients(base):
    q = quantize_params(base, CFG, group_size=32)
    qlora = apply_lora(q, CFG, rank=8, alpha=16, key=jax.random.key(7))
    for name in ("wqkv", "wo", "w1", "w2", "w3"):
        w = qlora["layers"][name]
        assert isinstance(w.base, QuantizedLinear) and w.base.weight.packed.dtype == jnp.uint8
        assert w.a.dtype == jnp.float32
    np.testing.assert_array_equal(_logits(qlora), _logits(q))
    mask = trainable_mask(qlora)
    assert sum(jax.tree.leaves(mask)) == 10  # a and b of five targets
    by_path = jax.tree_util.tree_map_with_path(lambda p, x: is_adapter_path(jax.tree_util.keystr(p), x), qlora)
    assert by_path == mask  # the path predicate the training loop can use agrees with the mask

    x = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 17)), jnp.int32)

    def loss(view, params):
        p = merge_trainable(params, view, mask)
        logits, _ = forward(p, x[:, :-1], config=CFG)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]))

    tx = optax.adam(3e-2)

    @jax.jit
    def step(view, opt):  # returns the gradient it applied, so one compile serves both checks
        l, g = jax.value_and_grad(loss)(view, qlora)
        up, opt = tx.update(g, opt, view)
        return optax.apply_updates(view, up), opt, l, g

    view = trainable_view(qlora, mask)
    opt = tx.init(view)
    _, _, _, g = step(view, opt)
    g_wqkv = g["layers"]["wqkv"]
    assert float(jnp.max(jnp.abs(g_wqkv.b))) > 0 and float(jnp.max(jnp.abs(g_wqkv.a))) == 0.0  # B = 0 at init
    _, _, _, g = step(trainable_view(_randomize_b(qlora, 8), mask), opt)
    for name in ("wqkv", "wo", "w1", "w2", "w3"):
        assert float(jnp.max(jnp.abs(g["layers"][name].a))) > 0, name
        assert float(jnp.max(jnp.abs(g["layers"][name].b))) > 0, name

    # A few Adam steps on the adapters alone lower the loss; the int4 base does not move.
    losses = []
    for _ in range(9):
        view, opt, l, _ = step(view, opt)
        losses.append(float(l))
    first, last = losses[0], losses[-1]
    trained = merge_trainable(qlora, view, mask)
    print(f"\nQLoRA loss {first:.4f} -> {last:.4f} after 8 adapter steps")
    assert last < first - 0.05
    assert trained["layers"]["w1"].base.weight.packed is qlora["layers"]["w1"].base.weight.packed

    # Merging a QLoRA model dequantizes the base.
    merged = merge_lora(trained)
    np.testing.assert_allclose(_logits(merged), _logits(trained), rtol=0, atol=1e-5)


def test_dropout_only_with_keys(base):
    lora = _randomize_b(apply_lora(base, CFG, rank=8, alpha=16, dropout=0.5, key=jax.random.key(9)), 10)
    plain = _logits(lora)
    mask = trainable_mask(lora)
    on = enable_dropout(lora, jax.random.key(11))
    assert on["layers"]["w1"].dropout_key.shape == (CFG.num_layers,)
    a, b = _logits(on), _logits(enable_dropout(lora, jax.random.key(12)))
    assert np.max(np.abs(a - plain)) > 1e-3 and np.max(np.abs(a - b)) > 1e-3
    np.testing.assert_array_equal(_logits(on), a)  # the same keys give the same masks
    assert jax.tree.structure(trainable_mask(lora)) == jax.tree.structure(mask)


def test_memory_reports(base):
    rows = memory_comparison(get_preset("internlm2-7b"), rank=64, alpha=16)
    print("\n" + format_memory_table(rows, "internlm2-7b (jax.eval_shape, no weights)"))
    full, lora, qlora = rows
    n = get_preset("internlm2-7b").num_params()
    assert full["total"] == 2 * n and full["trainable_params"] == n
    assert lora["frozen"] == 2 * n and qlora["adapters"] == lora["adapters"]
    # r=64 adapters on every layer matmul: L * r * (sum of in + out dims) fp32 parameters.
    c = get_preset("internlm2-7b")
    dims = (c.hidden_size + c.num_kv_heads * (c.groups + 2) * c.head_dim) + 2 * c.hidden_size \
        + 3 * (c.hidden_size + c.intermediate_size)
    assert lora["trainable_params"] == c.num_layers * 64 * dims and lora["adapters"] == 4 * lora["trainable_params"]
    assert qlora["frozen"] < 0.4 * lora["frozen"]

    tiny = memory_comparison(CFG, rank=8, group_size=32, params=base)
    print(format_memory_table(tiny, "internlm2-tiny (real params, float32)"))
    qlora_params = apply_lora(quantize_params(base, CFG, group_size=32), CFG, rank=8, key=jax.random.key(0))
    rep = param_memory_report(qlora_params)
    assert rep == {k: tiny[2][k] for k in rep}
    assert rep["int4"] > 0 and rep["total"] == rep["frozen"] + rep["adapters"]


def test_bad_inputs(base, tmp_path):
    with pytest.raises(ConfigError, match="unknown LoRA targets \\['q_proj'\\].*wqkv, wo, w1, w3, w2, output"):
        apply_lora(base, CFG, targets=("q_proj",), key=jax.random.key(0))
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        apply_lora(base, CFG, rank=0, key=jax.random.key(0))
    lora = apply_lora(base, CFG, rank=4, key=jax.random.key(0))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(lora, CFG, rank=4, key=jax.random.key(0))
    _, adapters = split_adapters(lora)
    other_cfg = get_preset("internlm2-tiny", vocab_size=256, intermediate_size=192)
    other = random_params(other_cfg)
    with pytest.raises(ConfigError, match="another shape"):
        merge_adapters(other, adapters)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        split_adapters(base)
    save_adapters(tmp_path / "peft", lora, CFG)
    with pytest.raises(ConfigError, match="another shape"):
        load_adapters(tmp_path / "peft", other_cfg)
    with pytest.raises(ConfigError, match="holds no adapters"):
        load_adapters(tmp_path, CFG)
    with pytest.raises(ConfigError, match="expects"):
        save_adapters("/nonexistent/never", lora, other_cfg)
