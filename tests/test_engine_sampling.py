"""Sampling: the vectorised sampler's filters and penalties, seeded reproducibility, n samples sharing the
prompt's pages, stop ids / strings, logprobs, max_tokens, eos."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.config import ConfigError, get_preset
from internlm_jax.engine import Engine, EngineConfig, SamplingParams
from internlm_jax.engine.reference import _uncached_logits, greedy_uncached
from internlm_jax.model import init_params
from internlm_jax.sampling import SamplingArrays, apply_penalties, sample

CFG = get_preset("internlm2-tiny")
MAX_LEN = 64
PAGE = 4

# ---- the sampler alone ----------------------------------------------------------------------------
_sample = jax.jit(sample)
PROBS = np.array([0.5, 0.3, 0.15, 0.05] + [0.0] * 12)
LOGITS = np.log(np.maximum(PROBS, 1e-30)).astype(np.float32)


def draw(n: int, **kw) -> np.ndarray:
    """n draws from LOGITS: n rows sharing one seed, each with its own counter (fold-in)."""
    sp = SamplingParams(**{"temperature": 1.0, "seed": 7, **kw})
    arrays = SamplingArrays.build([(sp, 7, i) for i in range(n)], n)
    logits = np.broadcast_to(LOGITS, (n, 16))
    zeros = np.zeros((n, 16), np.int32)
    return np.asarray(_sample(logits, zeros, zeros.astype(bool), arrays).tokens)


def test_temperature_one_matches_the_distribution():
    toks = draw(512)
    freq = np.bincount(toks, minlength=16) / 512
    sd = np.sqrt(PROBS * (1 - PROBS) / 512)
    assert np.all(np.abs(freq - PROBS) <= 5 * sd + 1e-9), freq


@pytest.mark.parametrize("kw,support", [(dict(top_k=2), {0, 1}), (dict(top_p=0.7), {0, 1}),
                                        (dict(top_p=0.85), {0, 1, 2}), (dict(min_p=0.5), {0, 1}),
                                        (dict(top_k=3, top_p=0.5), {0}), (dict(temperature=0.0), {0})])
def test_filters_restrict_the_support(kw, support):
    toks = set(draw(512, **kw).tolist())
    assert toks == support


def test_seed_gives_the_same_token_in_any_row():
    sp = SamplingParams(temperature=1.0)
    a = SamplingArrays.build([(sp, 11, 3), (sp, 12, 3), (sp, 11, 3), (sp, 11, 4)], 4)
    logits = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (4, 1))
    zeros = np.zeros((4, 16), np.int32)
    t = np.asarray(_sample(logits, zeros, zeros.astype(bool), a).tokens)
    assert t[0] == t[2]


def test_penalties_match_their_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 16)).astype(np.float32)
    counts = rng.integers(0, 3, (3, 16)).astype(np.int32)
    prompt = rng.random((3, 16)) < 0.3
    rows = [(SamplingParams(repetition_penalty=1.5), 0, 0), (SamplingParams(presence_penalty=0.7), 0, 0),
            (SamplingParams(frequency_penalty=0.4, repetition_penalty=0.8), 0, 0)]
    got = np.asarray(apply_penalties(logits, counts, prompt, SamplingArrays.build(rows, 3)))
    want = logits.copy()
    seen = prompt | (counts > 0)
    for r, rep in ((0, 1.5), (2, 0.8)):
        want[r] = np.where(seen[r], np.where(logits[r] > 0, logits[r] / rep, logits[r] * rep), logits[r])
    want[1] -= 0.7 * (counts[1] > 0)
    want[2] -= 0.4 * counts[2]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bad_sampling_params_are_rejected():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError, match="logprobs"):
        SamplingParams(logprobs=50)


# ---- through the engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def engine(params):
    ec = EngineConfig(page_size=PAGE, num_pages=48, max_num_seqs=4, max_model_len=MAX_LEN, max_num_batched_tokens=24,
                      chunk_size=16, max_prefill_rows=2, decode_batch_buckets=(4,), prefill_batch_buckets=(2,),
                      chunk_buckets=(16, MAX_LEN), width_buckets=(MAX_LEN // PAGE,), enable_prefix_caching=False)
    eng = Engine(params, CFG, ec, decode_fn=lambda ids: "".join(f"<{i}>" for i in ids))
    yield eng
    st = eng.stats()
    assert st["compilations"] == 0 and st["pages_used"] == 0, st


def _prompts(seed, n, lo=3, hi=30):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, CFG.vocab_size, int(rng.integers(lo, hi)))] for _ in range(n)]


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    prompts = _prompts(0, 4)
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=10, seed=1234, ignore_eos=True)
    alone = engine.generate(prompts[:1], sp)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = engine.generate(prompts, [sp, other, other, other])
    assert batch[0].outputs[0].token_ids == alone
    unseeded = engine.generate(prompts[:1] * 2, SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True))
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_n_samples_share_the_prompt_pages(engine):
    prompt = _prompts(1, 1, 30, 31)[0]
    hits = engine.allocator.hit_tokens
    out = engine.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True))[0]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    # prefix caching is off for this engine, yet samples 1 and 2 reuse the 7 full prompt pages of sample 0
    assert engine.allocator.hit_tokens - hits == 2 * ((len(prompt) - 1) // PAGE) * PAGE
    again = engine.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_stops_lengths_and_logprobs(engine, params):
    prompt = _prompts(2, 1, 20, 21)[0]
    ref = greedy_uncached(params, CFG, [prompt], 8, pad_to=MAX_LEN)[0]
    greedy = dict(temperature=0.0, ignore_eos=True)

    out = engine.generate([prompt], SamplingParams(max_tokens=8, logprobs=3, **greedy))[0].outputs[0]
    assert out.token_ids == ref and out.finish_reason == "length"
    logits = np.asarray(_uncached_logits(CFG)(params, np.array([prompt + ref[:-1]], np.int32)))[0]
    lsm = jax.nn.log_softmax(jnp.asarray(logits[len(prompt) - 1:]), axis=-1)
    want = np.asarray(lsm)[np.arange(8), ref]
    np.testing.assert_allclose(out.logprobs, want, atol=2e-5)
    assert all(len(t) == 3 and t[0][0] == tok for t, tok in zip(out.top_logprobs, ref))
    assert out.text == "".join(f"<{t}>" for t in ref)

    k = 3  # stop at the first occurrence of the 4th token (stop token ids end generation and are kept)
    stop_id = ref[k]
    cut = ref.index(stop_id)
    out = engine.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=(stop_id,), **greedy))[0].outputs[0]
    assert out.token_ids == ref[: cut + 1] and out.finish_reason == "stop"
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                   ))[0].outputs[0]  # eos (id 2) is not among ref: runs to length
    assert 2 not in ref and out.token_ids == ref

    stop = f"<{ref[4]}><{ref[5]}"  # spans two tokens and ends mid-token
    out = engine.generate([prompt], SamplingParams(max_tokens=8, stop=(stop,), **greedy))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[:6]
    assert out.text == "".join(f"<{t}>" for t in ref[:4])


def test_eos_stops_unless_ignored(params):
    prompt = _prompts(3, 1, 10, 11)[0]
    ref = greedy_uncached(params, CFG, [prompt], 6, pad_to=MAX_LEN)[0]
    ec = EngineConfig(page_size=PAGE, num_pages=48, max_num_seqs=4, max_model_len=MAX_LEN, max_num_batched_tokens=24,
                      chunk_size=16, max_prefill_rows=2, decode_batch_buckets=(4,), prefill_batch_buckets=(2,),
                      chunk_buckets=(16, MAX_LEN), width_buckets=(MAX_LEN // PAGE,), eos_token_ids=(ref[2],))
    eng = Engine(params, CFG, ec)
    out = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0]
    assert out.token_ids == ref[: ref.index(ref[2]) + 1] and out.finish_reason == "stop"
    out = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == ref and out.finish_reason == "length"


def test_penalties_through_the_engine_match_a_reference_loop(engine, params):
    prompts = _prompts(4, 3, 8, 20)
    sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10, repetition_penalty=1.3,
                        presence_penalty=0.5, frequency_penalty=0.3)
    got = [o.outputs[0].token_ids for o in engine.generate(prompts, sp)]
    assert got != greedy_uncached(params, CFG, prompts, 10, pad_to=MAX_LEN)  # the penalties do bite
    fn = _uncached_logits(CFG)
    for prompt, toks in zip(prompts, got):
        seq = list(prompt)
        for _ in range(10):
            buf = np.zeros((1, MAX_LEN), np.int32)
            buf[0, : len(seq)] = seq
            logits = np.asarray(fn(params, buf))[0, len(seq) - 1]
            gen = seq[len(prompt):]
            counts = np.bincount(gen, minlength=CFG.vocab_size) if gen else np.zeros(CFG.vocab_size, int)
            seen = counts > 0
            seen[prompt] = True
            logits = np.where(seen, np.where(logits > 0, logits / 1.3, logits * 1.3), logits)
            logits = logits - 0.5 * (counts > 0) - 0.3 * counts
            seq.append(int(np.argmax(logits)))
        assert toks == seq[len(prompt):]


def test_gumbel_noise_moments_and_independence():
    from internlm_jax.sampling import gumbel_noise

    g = np.asarray(gumbel_noise(np.arange(64, dtype=np.uint32), np.zeros(64, np.int32), 4096))
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.std() - np.pi / np.sqrt(6)) < 0.01  # Gumbel(0, 1)
    assert abs(np.corrcoef(g[:, :-1].ravel(), g[:, 1:].ravel())[0, 1]) < 0.01  # neighbouring tokens
    assert abs(np.corrcoef(g[:-1].ravel(), g[1:].ravel())[0, 1]) < 0.01  # neighbouring seeds
    h = np.asarray(gumbel_noise(np.arange(64, dtype=np.uint32), np.ones(64, np.int32), 4096))
    assert abs(np.corrcoef(g.ravel(), h.ravel())[0, 1]) < 0.01  # the next step of the same seed
