"""The async API on the background thread (submit, stream, abort, stats) and the compile counter under a
randomized workload of lengths and sampling options."""

from __future__ import annotations

import asyncio
import threading

import jax
import numpy as np
import pytest

from internlm_jax.config import get_preset
from internlm_jax.engine import Engine, EngineConfig, SamplingParams
from internlm_jax.engine.reference import greedy_uncached
from internlm_jax.engine.runner import BACKEND_COMPILES, install_compile_listener
from internlm_jax.model import init_params

CFG = get_preset("internlm2-tiny")
MAX_LEN = 64


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def engine(params):
    ec = EngineConfig(page_size=4, num_pages=48, max_num_seqs=4, max_model_len=MAX_LEN, max_num_batched_tokens=24,
                      chunk_size=16, max_prefill_rows=2, decode_batch_buckets=(2, 4), prefill_batch_buckets=(2,),
                      chunk_buckets=(16,), width_buckets=(MAX_LEN // 4,), enable_prefix_caching=True)
    eng = Engine(params, CFG, ec, decode_fn=lambda ids: "".join(chr(97 + i % 26) for i in ids))
    yield eng
    eng.shutdown()


def _prompts(seed, n):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, CFG.vocab_size, int(rng.integers(2, 40)))] for _ in range(n)]


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_async_streams_concurrent_requests_and_abort(engine, params):
    prompts = _prompts(0, 6)
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def consume(p):
        toks, text = [], ""
        async for ev in engine.submit(p, sp):
            assert threading.current_thread() is threading.main_thread()
            if ev.token_id is not None:
                toks.append(ev.token_id)
            text += ev.text
            last = ev
        return toks, text, last.finish_reason

    async def consume_and_abort(p):
        stream = engine.submit(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        n = 0
        async for ev in stream:
            n += 1
            if n == 2:
                await stream.aclose()  # client went away: abort, pages freed at once
                break
        return n

    async def main():
        return await asyncio.gather(*[consume(p) for p in prompts], consume_and_abort(prompts[0]))

    results = asyncio.run(main())
    want = greedy_uncached(params, CFG, prompts, 8, pad_to=MAX_LEN)
    for (toks, text, reason), w in zip(results[:-1], want):
        assert toks == w and reason == "length" and text == "".join(chr(97 + i % 26) for i in w)
    assert results[-1] == 2
    engine.shutdown()
    st = engine.stats()
    assert st["running"] == 0 and st["waiting"] == 0 and st["pages_used"] == 0 and st["compilations"] == 0, st


def test_no_compilation_after_warmup_under_a_randomized_workload(engine):
    rng = np.random.default_rng(1)
    prompts = _prompts(2, 24)
    samplings = []
    for i in range(24):
        samplings.append(SamplingParams(
            max_tokens=int(rng.integers(1, 20)), temperature=float(rng.choice([0.0, 0.7, 1.3])),
            top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.8])), min_p=float(rng.choice([0.0, 0.1])),
            repetition_penalty=float(rng.choice([1.0, 1.2])), presence_penalty=float(rng.choice([0.0, 0.5])),
            frequency_penalty=float(rng.choice([0.0, 0.3])), seed=int(rng.integers(0, 100)),
            n=int(rng.choice([1, 1, 2])), logprobs=rng.choice([None, 0, 5]), stop=("xyz",) if i % 5 == 0 else ()))
    engine.shutdown()  # drive it from this thread, so the backend-compile listener sees the steps
    steps = engine.stats()["steps"]
    outs = engine.generate(prompts, samplings)
    assert all(len(o.outputs) == sp.n for o, sp in zip(outs, samplings))
    st = engine.stats()
    assert st["steps"] - steps > 20 and st["compilations"] == 0, st
    assert st["bucket_compiles_after_warmup"] == 0 and st["backend_compiles_after_warmup"] == 0
    assert st["pages_used"] == 0


def test_the_counters_do_count():
    install_compile_listener()
    tid = threading.get_ident()
    before = BACKEND_COMPILES[tid]
    jax.jit(lambda x: x * 3 + 1)(np.arange(7))  # a fresh function: one backend compile on this thread
    assert BACKEND_COMPILES[tid] == before + 1


def test_a_bucket_miss_is_counted(params):
    ec = EngineConfig(page_size=4, num_pages=48, max_num_seqs=4, max_model_len=MAX_LEN, max_num_batched_tokens=24,
                      chunk_size=16, max_prefill_rows=2, decode_batch_buckets=(2, 4), prefill_batch_buckets=(2,),
                      chunk_buckets=(16,), width_buckets=(MAX_LEN // 4,))
    eng = Engine(params, CFG, ec)
    del eng.runner._executables[(2, 1, 16)]  # pretend warm-up skipped the 2-row decode bucket
    eng.generate(_prompts(3, 1), SamplingParams(temperature=0.0, max_tokens=3))
    assert eng.stats()["bucket_compiles_after_warmup"] == 1 and eng.stats()["compilations"] >= 1
