"""The notebook API: generation equals greedy decoding by uncached forward; clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

import internlm_jax as ij


@pytest.fixture(scope="module")
def lm():
    return ij.init("internlm2-tiny", seed=0)


def _greedy_uncached(lm, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits, _ = ij.forward(lm.params, jnp.asarray([seq]), config=lm.config)
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_batched_generate_matches_uncached_greedy(lm):
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 40, 41], [1, 300]]
    out = lm.generate(prompts, 12, stop_token_ids=[], return_details=True)
    for p, g in zip(prompts, out):
        want = _greedy_uncached(lm, p, len(g.token_ids))
        assert g.token_ids == want
        assert g.prompt_tokens == len(p)


def test_logits_ragged_batch_equals_single(lm):
    a, b = [1, 2, 3, 4, 5, 6, 7], [1, 9, 8]
    la, lb = lm.logits([a, b])
    np.testing.assert_allclose(lb, lm.logits(b), atol=1e-5)
    assert la.shape == (7, lm.config.vocab_size)


def test_sampling_is_reproducible_by_seed(lm):
    p = [[1, 5, 6, 7]]
    x = lm.generate(p, 10, temperature=1.0, top_p=0.9, top_k=50, seed=3, stop_token_ids=[], return_details=True)
    y = lm.generate(p, 10, temperature=1.0, top_p=0.9, top_k=50, seed=3, stop_token_ids=[], return_details=True)
    z = lm.generate(p, 10, temperature=1.0, seed=4, stop_token_ids=[], return_details=True)
    assert x[0].token_ids == y[0].token_ids
    assert x[0].token_ids != z[0].token_ids


def test_errors_are_clear(lm, tmp_path):
    with pytest.raises(ij.ConfigError, match="context"):
        lm.generate([[1] * 600], 8)
    with pytest.raises(ij.ConfigError, match="outside the vocabulary"):
        lm.logits([1, 5000])
    with pytest.raises(ij.ConfigError, match="ij.init"):
        ij.load("internlm2-7b")
    with pytest.raises(ij.ConfigError, match="no checkpoint"):
        ij.load(str(tmp_path / "missing"))
    with pytest.raises(ij.ConfigError, match="max_new_tokens"):
        lm.generate([[1, 2]], 0)
    with pytest.raises(ij.ConfigError, match="unknown model preset"):
        ij.init("internlm2-7bb")


def test_real_size_param_counts():
    import jax

    counts = {}
    for name in ("internlm2-1_8b", "internlm2-7b", "internlm2-20b"):
        cfg = ij.get_preset(name)
        shapes = jax.eval_shape(lambda c=cfg: ij.init_params(c, jax.random.key(0)))
        counts[name] = sum(x.size for x in jax.tree.leaves(shapes))
    # 7B: the released fp16 index's total_size is 15,475,417,088 bytes.
    assert counts["internlm2-7b"] * 2 == 15_475_417_088
    assert 1.85e9 < counts["internlm2-1_8b"] < 1.95e9
    assert 19.5e9 < counts["internlm2-20b"] < 20.2e9


def test_load_opens_quantized_checkpoints(lm, tmp_path):
    from internlm_jax.api import LM
    from internlm_jax.quant.int4 import quantize_params
    from internlm_jax.quant.io import save_quantized

    qparams = quantize_params(lm.params, lm.config, group_size=32)
    save_quantized(str(tmp_path / "q"), qparams, lm.config)
    loaded = ij.load(str(tmp_path / "q"))
    assert type(loaded.params["layers"]["wqkv"]).__name__ == "QuantizedLinear"
    ids = [1, 5, 6, 7, 8]
    np.testing.assert_array_equal(loaded.logits(ids), LM(lm.config, qparams).logits(ids))
