"""Host-side engine pieces without a device: page allocator, prefix hashes, scheduler, detokeniser."""

from __future__ import annotations

import numpy as np
import pytest

from internlm_jax.engine.detok import IncrementalText
from internlm_jax.engine.pages import PageAllocator, page_hashes
from internlm_jax.engine.scheduler import FINISHED, RUNNING, Scheduler, SchedulerConfig, Sequence
from internlm_jax.sampling import SamplingParams


def test_allocator_refcounts_and_lru_eviction():
    a = PageAllocator(4, 2)
    p = a.allocate(3)
    assert p == [0, 1, 2] and a.num_free == 1
    assert a.allocate(2) is None and a.num_free == 1  # nothing taken on failure
    h = page_hashes([5, 6, 7, 8], 2, 2)
    a.register(p[0], h[0])
    a.register(p[1], h[1])
    a.retain(p[:2])  # a second sequence shares both pages
    a.release(p)
    assert list(a.refcount) == [1, 1, 0, 0] and a.num_free == 2
    a.release(p[:2])
    assert a.num_free == 4 and a.num_cached == 2  # unreferenced but still cached
    assert a.lookup(h) == [0, 1] and a.num_free == 2
    a.release([0, 1])
    # the free list is used before cached pages; then the LRU cached page (the tail page 1) goes first.
    q = a.allocate(3)
    assert set(q[:2]) == {2, 3} and q[2] == 1 and a.evictions == 1
    assert a.lookup(h) == [0]  # the head page survives, the chain breaks at the evicted page
    a.check_invariants()
    with pytest.raises(RuntimeError, match="released more often"):
        a.release([3, 3])


def test_prefix_hash_keys_the_whole_prefix():
    a = page_hashes([1, 2, 3, 4, 5, 6], 2, 3)
    b = page_hashes([9, 2, 3, 4, 5, 6], 2, 3)
    assert a[0] != b[0] and a[1] != b[1] and a[2] != b[2]  # same page tokens, different history
    assert page_hashes([1, 2, 3, 4, 7, 7], 2, 3)[:2] == a[:2]
    with pytest.raises(ValueError, match="not full"):
        page_hashes([1, 2, 3], 2, 2)


def _simulate(cfg: SchedulerConfig, num_pages: int, workload, rng, abort_prob=0.0):
    """Drive the scheduler with fake model outputs; check invariants every step; return the allocator."""
    alloc = PageAllocator(num_pages, cfg.page_size)
    sched = Scheduler(cfg, alloc)
    pending = list(workload)
    seqs = []
    for _ in range(10_000):
        if pending and rng.random() < 0.5:
            prompt, max_new = pending.pop()
            s = Sequence(len(seqs), None, 0, list(prompt), len(prompt), SamplingParams(max_tokens=max_new), 0)
            seqs.append(s)
            sched.add(s)
        rows = sched.schedule()
        budget_used = sum(r.n for r in rows if r.n > 1)
        assert budget_used <= max(cfg.max_num_batched_tokens, 0) or not cfg.chunked_prefill
        assert len({r.seq.slot for r in rows}) == len(rows) and len(sched.running) <= cfg.max_num_seqs
        for r in rows:  # every row's pages cover what it writes, and no two sequences write one page
            assert len(r.seq.pages) * cfg.page_size >= r.start + r.n
            assert all(alloc.refcount[p] == 1 for p in r.seq.pages[r.start // cfg.page_size:])
        sched.after_step(rows)
        for r in rows:
            if r.sample:
                r.seq.tokens.append(int(rng.integers(3, 50)))
                if r.seq.num_generated >= r.seq.sampling.max_tokens:
                    sched.finish(r.seq, "length")
        if sched.running and rng.random() < abort_prob:
            sched.finish(sched.running[int(rng.integers(len(sched.running)))], "abort")
        alloc.check_invariants()
        if not pending and not sched.has_work():
            break
    assert all(s.status == FINISHED for s in seqs)
    return alloc, sched


@pytest.mark.parametrize("chunked,prefix,pages", [(True, True, 12), (False, False, 40), (True, False, 8)])
def test_scheduler_random_workload_frees_every_page(chunked, prefix, pages):
    rng = np.random.default_rng(0)
    shared = list(rng.integers(3, 50, 12))
    workload = [((shared if i % 3 == 0 else []) + list(rng.integers(3, 50, int(rng.integers(1, 20)))),
                 int(rng.integers(1, 12))) for i in range(40)]
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, chunk_size=8, chunked_prefill=chunked,
                          max_prefill_rows=2, page_size=4, enable_prefix_caching=prefix)
    alloc, sched = _simulate(cfg, pages, workload, rng, abort_prob=0.05)
    assert alloc.num_used == 0 and alloc.num_free == pages
    if pages == 8:
        assert sched.num_preemptions > 0  # a pool this small must preempt
    if prefix:
        assert alloc.hit_tokens > 0


def test_preempted_sequence_resumes_from_prefix_cache():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, chunk_size=16, chunked_prefill=True,
                          max_prefill_rows=2, page_size=4, enable_prefix_caching=True)
    alloc = PageAllocator(4, 4)
    sched = Scheduler(cfg, alloc)
    old = Sequence(0, None, 0, list(range(3, 10)), 7, SamplingParams(), 0)
    new = Sequence(1, None, 0, list(range(20, 27)), 7, SamplingParams(), 0)
    sched.add(old)
    sched.add(new)
    rows = sched.schedule()
    assert [r.seq for r in rows] == [old, new] and alloc.num_free == 0
    sched.after_step(rows)
    old.tokens.append(11)
    new.tokens.append(30)
    old.tokens.append(12)  # pretend old sampled twice: it now needs a third page, the pool is empty
    old.num_computed = 8
    rows = sched.schedule()
    assert new.status != RUNNING and new.num_preemptions == 1 and [r.seq for r in rows] == [old]
    # new's first full page was registered, so readmission takes it back from the prefix cache
    sched.after_step(rows)
    sched.finish(old, "length")
    rows = sched.schedule()
    assert rows[0].seq is new and rows[0].start == 4 and new.cached_tokens == 0


def test_detokeniser_stop_strings_span_tokens_and_hold_back():
    vocab = {3: "Hel", 4: "lo", 5: " wor", 6: "ld", 7: "!", 8: " E", 9: "ND", 10: " x"}
    decode = lambda ids: "".join(vocab.get(i, "") for i in ids)  # noqa: E731
    t = IncrementalText(decode, [3], stop=("world",))
    streamed = ""
    for tok in (4, 5):
        assert not t.push(tok)
        streamed += t.take(False)
    assert streamed == "lo" and t.text == "lo wor"  # " wor" could start "world": held back
    assert t.push(6)
    streamed += t.take(True)
    assert streamed == "lo " and t.text == "lo "
    t2 = IncrementalText(decode, [], stop=(" END",), include_stop=True)
    for tok in (3, 4, 8):
        t2.push(tok)
    assert t2.push(9) and t2.text == "Hello END"


def test_detokeniser_waits_for_complete_utf8():
    # byte-level tokens: "é" is two bytes, split over two tokens; the first alone decodes to U+FFFD.
    decode = lambda ids: bytes(i - 3 for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    data = [b + 3 for b in "aé".encode()]
    t = IncrementalText(decode, [])
    out = []
    for tok in data:
        t.push(tok)
        out.append(t.take(False))
    assert out == ["a", "", "é"]


def test_detokeniser_with_the_project_tokenizer_streams_multibyte_text_intact(tmp_path):
    fixtures = pytest.importorskip("fixtures")
    from internlm_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(fixtures.make_tokenizer_dir(tmp_path / "tok", vocab_size=1024))
    text = "你好，世界！🙂 Have a nice day! 上海人工智能实验室 def add(a, b):\n    return a + b"
    ids = tok.encode(text, add_bos=False)
    t = IncrementalText(tok.decode, tok.encode("Hello", add_bos=True), stop=("实验室 def",))
    chunks = []
    for i in ids:
        stopped = t.push(i)
        chunks.append(t.take(stopped))
        if stopped:
            break
    assert "\ufffd" not in "".join(chunks) and "".join(chunks) == text[: text.index("实验室 def")]
