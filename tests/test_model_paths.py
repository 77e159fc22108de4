"""One model path: every way of running the model (notebook logits and generate, the engine with chunked
prefill / prefix hits / preemption, eval scoring, the server) agrees with a numpy reference of the official
InternLM2 rotary rule on dynamic-NTK and linear checkpoints, at lengths inside max_position_embeddings, between
it and the next padded bucket, and beyond max_position_embeddings x factor (with max_context)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ntk_reference import NumpyInternLM2, log_softmax

import internlm_jax as ij
from internlm_jax.engine import Engine, EngineConfig, SamplingParams
from internlm_jax.evaluate.likelihood import Scorer

M = 48  # max_position_embeddings: small, so long lengths are cheap
# 40: inside M; 60: past M but inside the next padded bucket (64); 110: beyond M x factor (96)
LENGTHS = (40, 60, 110)
NEW = 6


def _lm(scaling=("dynamic", 2.0)):
    lm = ij.init("internlm2-tiny", seed=3, max_position_embeddings=M, rope_scaling=scaling, max_context=160)
    # std 0.1 weights: logits spread enough that greedy choices are not near-ties
    lm.params = jax.tree_util.tree_map_with_path(
        lambda p, x: x if "norm" in jax.tree_util.keystr(p) else x * 5.0, lm.params)
    return lm


@pytest.fixture(scope="module")
def ntk():
    lm = _lm()
    return lm, NumpyInternLM2(jax.device_get(lm.params), lm.config)


def _prompts(n_max=max(LENGTHS)):
    rng = np.random.default_rng(0)
    return {n: [1] + [int(t) for t in rng.integers(3, 1000, n - 1)] for n in LENGTHS}


def test_logits_match_the_official_rule_at_every_length(ntk):
    lm, ref = ntk
    prompts = _prompts()
    got = lm.logits([prompts[n] for n in LENGTHS])  # one padded batch of three lengths
    for n, g in zip(LENGTHS, got):
        np.testing.assert_allclose(g, ref.logits(prompts[n]), atol=2e-4, rtol=0, err_msg=f"length {n}")


@pytest.mark.parametrize("scaling", [("linear", 2.0), None])
def test_linear_and_no_scaling(scaling):
    lm = _lm(scaling)
    ref = NumpyInternLM2(jax.device_get(lm.params), lm.config)
    p = _prompts()[110]
    np.testing.assert_allclose(lm.logits(p), ref.logits(p), atol=2e-4, rtol=0)


def test_generate_matches_the_official_decode_rule(ntk):
    lm, ref = ntk
    prompts = _prompts()
    want = {n: ref.greedy(prompts[n], NEW) for n in LENGTHS}
    got = lm.generate([prompts[n] for n in LENGTHS], NEW, return_details=True)
    for n, g in zip(LENGTHS, got):
        assert g.token_ids == want[n][: len(g.token_ids)] and len(g.token_ids) >= 1, f"length {n}"


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_engine_chunked_prefix_hits_and_preemption(ntk):
    lm, ref = ntk
    prompts = _prompts()
    want = {n: ref.greedy(prompts[n], NEW) for n in LENGTHS}
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    # 16-token chunks: a 110-token prompt is prefilled in 7 calls, each rotated for the whole prompt.
    ec = EngineConfig(page_size=8, num_pages=20, max_num_seqs=4, max_model_len=128, max_num_batched_tokens=24,
                      chunk_size=16, max_prefill_rows=2, warmup=False)
    eng = Engine(lm.params, lm.config, ec)
    for _ in range(2):  # the second round hits the prefix cache (same lengths, same rotation)
        outs = eng.generate([prompts[n] for n in LENGTHS], sp)
        for n, o in zip(LENGTHS, outs):
            assert o.outputs[0].token_ids == want[n], f"length {n}"
    st = eng.stats()
    assert st["prefix_hit_tokens"] > 0
    # 20 pages of 8 cannot hold three sequences of up to 116 tokens at once: some are preempted and
    # recomputed (their generated tokens keep the decode rotation), and still agree.
    assert st["preemptions"] > 0
    # A prompt of another length past M shares no pages with them (its keys are rotated differently).
    other = prompts[110][:100]
    out = eng.generate([other], sp)[0]
    assert out.outputs[0].token_ids == ref.greedy(other, NEW)
    assert out.cached_tokens == 0


def test_eval_scoring_matches(ntk):
    lm, ref = ntk
    prompts = _prompts()
    scorer = Scorer(lm.params, lm.config, batch_size=4)
    reqs = [(prompts[n][: n - 5], prompts[n][n - 5:]) for n in LENGTHS]
    for (ctx, cont), res in zip(reqs, scorer.score(reqs)):
        # the model input is context + continuation minus its last token (as lm-eval feeds HF models), so
        # under dynamic NTK its rotation is for that length
        lp = log_softmax(ref.logits(ctx + cont[:-1]))
        want = sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))
        assert abs(res.logprob - want) < 1e-4


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_server_scoring_and_generation_match(ntk):
    import httpx

    from internlm_jax.serve.testing import serve_in_thread, tiny_engine

    lm, ref = ntk
    p = _prompts()[60]
    engine = tiny_engine(lm, max_len=128, chunk=16, max_batch=2, page_size=8, num_pages=40)
    try:
        with serve_in_thread(engine, None) as (url, _):
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": NEW,
                                                          "temperature": 0, "logprobs": 0, "echo": True},
                           timeout=120)
            assert r.status_code == 200, r.text
            lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    finally:
        engine.shutdown()
    lp = log_softmax(ref.logits(p))
    want = [lp[i - 1, p[i]] for i in range(1, len(p))]
    np.testing.assert_allclose(lps[1: len(p)], want, atol=2e-4)
    # the generated tokens' logprobs follow the decode rule (each new token rotated for its own length)
    _, gen_lps = ref.greedy(p, NEW, with_logprobs=True)
    np.testing.assert_allclose(lps[len(p):], gen_lps, atol=2e-4)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_same_seed_same_tokens_on_every_path(tmp_path):
    """One sampler: a seeded, sampled request gives the same tokens from lm.generate, the engine and the
    server."""
    import httpx
    from fixtures import make_tokenizer_dir

    from internlm_jax.serve.testing import serve_in_thread, tiny_engine

    lm = ij.init("internlm2-tiny", seed=5, tokenizer=make_tokenizer_dir(tmp_path / "tok"))
    prompt = [1, 17, 99, 240, 33, 8]
    kw = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    notebook = lm.generate([prompt], 12, return_details=True, **kw)[0]
    sp = SamplingParams(max_tokens=12, stop_token_ids=(lm.config.eos_token_id, lm.tokenizer.im_end_id), **kw)
    engine = tiny_engine(lm, max_len=64, chunk=16, max_batch=2)
    try:
        direct = engine.generate([prompt], sp)[0].outputs[0].token_ids
        with serve_in_thread(engine, lm.tokenizer) as (url, _):
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12, **kw},
                           timeout=120)
            assert r.status_code == 200, r.text
            served = r.json()["choices"][0]["text"]
    finally:
        engine.shutdown()
    want = notebook.token_ids + ([notebook.stop_token_id] if notebook.stop_token_id is not None else [])
    assert direct == want
    assert served == notebook.text and len(notebook.token_ids) > 3
