"""Continuous batching: greedy outputs equal each request decoded alone (uncached forward), with chunked
prefill on and off, with prefix-cache hits and with preemption; no page leaks; no compiles after warm-up."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from internlm_jax.config import get_preset
from internlm_jax.engine import Engine, EngineConfig, SamplingParams
from internlm_jax.engine.reference import greedy_uncached
from internlm_jax.model import init_params

CFG = get_preset("internlm2-tiny")
MAX_LEN = 64
PAGE = 4
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def make_engine(params, **kw) -> Engine:
    # Every engine here has the same pool and buckets, so they share compiled executables (3 in all).
    base = dict(page_size=PAGE, num_pages=48, max_num_seqs=4, max_model_len=MAX_LEN, max_num_batched_tokens=24,
                chunk_size=16, max_prefill_rows=2, decode_batch_buckets=(4,), prefill_batch_buckets=(2,),
                chunk_buckets=(16, MAX_LEN), width_buckets=(MAX_LEN // PAGE,), enable_prefix_caching=False)
    base.update(kw)
    return Engine(params, CFG, EngineConfig(**base))


def random_workload(seed: int, n: int = 10, max_prompt: int = 40, max_new: int = 12):
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, CFG.vocab_size, int(rng.integers(1, max_prompt)))] for _ in range(n)]
    news = [int(rng.integers(1, max_new)) for _ in range(n)]
    return prompts, news


def run_random_arrivals(engine: Engine, prompts, news, seed: int) -> list[list[int]]:
    """Submit requests at random steps while the engine runs; collect each request's tokens."""
    rng = np.random.default_rng(seed)
    got: dict[str, list[int]] = {}
    ids = []

    def sink(ev):
        if ev.token_id is not None:
            got[ev.request_id].append(ev.token_id)

    order = list(range(len(prompts)))
    queue = list(order)
    while queue or engine.has_unfinished():
        while queue and rng.random() < 0.4:
            i = queue.pop(0)
            rid = engine.add_request(prompts[i], SamplingParams(max_tokens=news[i], **GREEDY), on_event=sink)
            got[rid] = []
            ids.append(rid)
        engine.step()
    return [got[r] for r in ids]


def assert_clean(engine: Engine) -> None:
    st = engine.stats()
    assert st["running"] == 0 and st["waiting"] == 0
    assert st["pages_used"] == 0 and st["pages_free"] == st["pages_total"], st
    assert st["compilations"] == 0, st
    engine.allocator.check_invariants()


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole-prompt"])
def test_continuous_batching_equals_alone(params, chunked):
    kw = {} if chunked else dict(chunked_prefill=False)
    engine = make_engine(params, **kw)
    prompts, news = random_workload(1)
    got = run_random_arrivals(engine, prompts, news, seed=2)
    want = greedy_uncached(params, CFG, prompts, news, pad_to=MAX_LEN)
    assert got == want
    st = engine.stats()
    assert st["steps"] < sum(news) + len(prompts)  # requests really shared steps
    assert_clean(engine)


def test_prefix_cache_hits_equal_alone_and_chat_turn_reuses_pages(params):
    engine = make_engine(params, enable_prefix_caching=True)
    rng = np.random.default_rng(3)
    system = [int(t) for t in rng.integers(3, CFG.vocab_size, 18)]
    prompts = [system + [int(t) for t in rng.integers(3, CFG.vocab_size, int(rng.integers(1, 12)))]
               for _ in range(10)]
    news = [int(rng.integers(1, 10)) for _ in range(10)]
    first = engine.generate(prompts[:1], SamplingParams(max_tokens=news[0], **GREEDY))
    got = [first[0].outputs[0].token_ids] + run_random_arrivals(engine, prompts[1:], news[1:], seed=4)
    want = greedy_uncached(params, CFG, prompts, news, pad_to=MAX_LEN)
    assert got == want
    st = engine.stats()
    assert st["prefix_hit_tokens"] >= 9 * (len(system) // PAGE) * PAGE, st

    # A second chat turn: the prompt is turn 1's prompt + answer + a new message. Every full page that turn 1
    # computed (prompt + answer minus the last sampled token, which was never fed) comes from the cache.
    turn1 = prompts[3]
    ans = engine.generate([turn1], SamplingParams(max_tokens=9, **GREEDY))[0].outputs[0].token_ids
    turn2 = turn1 + ans + [7, 8, 9, 10, 11]
    before = engine.stats()["prefill_tokens"]
    out2 = engine.generate([turn2], SamplingParams(max_tokens=3, **GREEDY))[0]
    computed = len(turn1) + len(ans) - 1
    assert out2.cached_tokens == (computed // PAGE) * PAGE > 0
    assert engine.stats()["prefill_tokens"] - before == len(turn2) - out2.cached_tokens
    assert out2.outputs[0].token_ids == greedy_uncached(params, CFG, [turn2], 3, pad_to=MAX_LEN)[0]
    assert_clean(engine)


def test_preemption_with_small_pool_equals_alone_and_frees_pages(params):
    # 48 pages of 4 tokens; four ~56-token sequences need 56 pages: the newest get preempted and recomputed.
    engine = make_engine(params, enable_prefix_caching=True)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, CFG.vocab_size, int(rng.integers(30, 40)))] for _ in range(8)]
    news = [int(rng.integers(16, 24)) for _ in range(8)]
    got = run_random_arrivals(engine, prompts, news, seed=6)
    assert engine.stats()["preemptions"] > 0
    assert got == greedy_uncached(params, CFG, prompts, news, pad_to=MAX_LEN)
    assert_clean(engine)


def test_abort_frees_pages_at_once(params):
    engine = make_engine(params)
    prompts, news = random_workload(7, n=6)
    news = [12] * 6
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, news)]
    for _ in range(3):
        engine.step()
    running = [s.request.request_id for s in engine.scheduler.running]
    used = engine.stats()["pages_used"]
    assert running and used > 0
    assert engine.abort(running[0]) and engine.abort(ids[-1])  # one running, one still waiting
    assert engine.stats()["pages_used"] < used
    assert not engine.abort("no-such-request")
    while engine.has_unfinished():
        engine.step()
    assert_clean(engine)
