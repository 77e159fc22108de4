"""The grain pre-training pipeline: packing invariants, resume exactness, mixtures, per-process shards."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from internlm_jax.config import ConfigError
from internlm_jax.data import DataConfig, DataError, SourceConfig, build_pretrain_pipeline
from internlm_jax.data.pipeline import DataIterator

BOS, EOS, PAD = 1, 2, 0
KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


class TracingTokenizer:
    """Text is words "K_J"; each becomes the id 10 + 1000*K + J, so every token names its document K and
    its place J in it, and a packed stream can be checked token by token against its source documents."""

    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [10 + 1000 * int(k) + int(j) for k, j in (w.split("_") for w in text.split())]
        return [BOS, *ids] if add_bos else ids


def doc_of(token: int) -> int:
    return (token - 10) // 1000


def write_docs(path, doc_ids, rng: random.Random, max_len: int = 90) -> dict[int, int]:
    """jsonl of documents whose lengths vary from 0 (empty text) to max_len words; returns {K: length}."""
    lengths = {}
    with open(path, "w") as f:
        for k in doc_ids:
            n = 0 if rng.random() < 0.05 else rng.randint(1, max_len)
            lengths[k] = n
            f.write(json.dumps({"text": " ".join(f"{k}_{j}" for j in range(n)), "id": k}) + "\n")
    return lengths


def make_iter(paths, *, weights=None, batch=4, seed=0, seq_len=32, **overrides) -> DataIterator:
    weights = weights or [1.0] * len(paths)
    sources = tuple(SourceConfig(str(p), weight=w) for p, w in zip(paths, weights))
    kwargs = {"global_batch_size": batch, "seed": seed}
    for k in ("process_index", "process_count", "global_batch_size"):
        if k in overrides:
            kwargs[k] = overrides.pop(k)
    return build_pretrain_pipeline(DataConfig(sources=sources, seq_len=seq_len, **overrides), TracingTokenizer(),
                                   **kwargs)


def drain(it) -> list[dict[str, np.ndarray]]:
    return list(it)


def rows_of(batches):
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            yield {k: b[k][r] for k in KEYS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    a = write_docs(d / "a.jsonl", range(120), rng)
    b = write_docs(d / "b.jsonl", range(500, 560), rng)
    return d / "a.jsonl", a, d / "b.jsonl", b


def check_rows(batches, seq_len):
    """Per-row invariants; returns the (input, target) pairs of every packed piece."""
    pairs = []
    for row in rows_of(batches):
        tok, tgt, pos, seg, mask = (row[k] for k in KEYS)
        assert tok.dtype == tgt.dtype == pos.dtype == seg.dtype == np.int32 and mask.dtype == np.float32
        assert tok.shape == (seq_len,)
        n_valid = int((seg > 0).sum())
        if n_valid == 0:  # a padding row filling up the short last batch
            assert np.all(tok == PAD) and np.all(tgt == -1) and np.all(mask == 0)
            continue
        # Pieces fill the row from the left; padding only at the end, with the padding values.
        assert np.all(seg[:n_valid] > 0) and np.all(seg[n_valid:] == 0)
        assert np.all(tok[n_valid:] == PAD) and np.all(tgt[n_valid:] == -1) and np.all(pos[n_valid:] == 0)
        np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
        ids = seg[:n_valid]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1), ids
        for s in np.unique(ids):
            sel = np.flatnonzero(seg == s)
            # Positions restart at 0 in every piece (continuation pieces too).
            np.testing.assert_array_equal(pos[sel], np.arange(len(sel)))
            body = [int(t) for t in tok[sel] if t >= 10] + [int(t) for t in tgt[sel] if t >= 10]
            assert len({doc_of(t) for t in body}) <= 1, "a segment mixes two documents"
            pairs.append(list(zip(tok[sel].tolist(), tgt[sel].tolist())))
    return pairs


def check_documents(pairs, lengths):
    """Every document's tokens come out exactly once as inputs and as targets, in order, none lost."""
    seen = {k: [] for k in lengths}
    bos_count = eos_count = 0
    for piece in pairs:
        for inp, tgt in piece:
            if inp == BOS:
                bos_count += 1
            if tgt == EOS:
                eos_count += 1
            doc = doc_of(tgt) if tgt >= 10 else doc_of(inp) if inp >= 10 else None
            if doc is not None:
                seen[doc].append((inp, tgt))
    assert bos_count == eos_count == len(lengths)
    for k, n in lengths.items():
        body = [10 + 1000 * k + j for j in range(n)]
        full = [BOS, *body, EOS]
        expected = list(itertools.pairwise(full))
        got = sorted(seen[k], key=lambda p: -1 if p[0] == BOS else p[0])
        if n == 0:  # [BOS, EOS]: the pair has no body token to name the document
            assert got == []
            continue
        assert got == expected, f"document {k}: pairs lost, duplicated or wrong"


def test_packing_loses_and_duplicates_nothing(corpus):
    path, lengths, _, _ = corpus
    for shuffle in (False, True):
        batches = drain(make_iter([path], num_epochs=1, shuffle=shuffle, shuffle_buffer=16))
        pairs = check_rows(batches, 32)
        check_documents(pairs, lengths)
        n_pairs = sum(len(p) for p in pairs)
        assert n_pairs == sum(n + 1 for n in lengths.values())  # n body tokens + BOS + EOS -> n + 1 pairs
        # Packing leaves no holes: only the stream's final row is part-filled (row shuffling may move it
        # within its window), and all-padding rows only fill up the short last batch.
        part = [r for r in rows_of(batches) if 0 < (r["segment_ids"] > 0).sum() < 32]
        assert len(part) <= 1
        empty = [i for i, b in enumerate(batches) for s in b["segment_ids"] if s.max() == 0]
        assert all(i == len(batches) - 1 for i in empty)
        # Documents longer than a row were split, and their continuation pieces start at position 0.
        assert max(lengths.values()) + 1 > 32
        starts = [p[0] for p in pairs]
        assert any(inp != BOS for inp, _ in starts)


def test_segment_boundaries_and_last_target(corpus):
    path, _, _, _ = corpus
    batches = drain(make_iter([path], num_epochs=1, shuffle=False, shuffle_buffer=0))
    n_boundaries = 0
    for row in rows_of(batches):
        tok, tgt, pos, seg, mask = (row[k] for k in KEYS)
        # Where a new document begins (BOS as input) inside a row, the slot before it is the previous
        # document's last pair: its target is EOS, it counts in the loss, and the segment id steps by one.
        inner = np.flatnonzero(tok == BOS)
        for i in inner[inner > 0]:
            assert tgt[i - 1] == EOS and mask[i - 1] == 1
            assert seg[i] == seg[i - 1] + 1 and pos[i] == 0
            n_boundaries += 1
        # Every segment change inside a row is a document start (BOS), never a split within a document.
        changes = np.flatnonzero(np.diff(seg) != 0) + 1
        for i in changes:
            assert seg[i] == 0 or tok[i] == BOS
    assert n_boundaries > 50


def test_state_restore_gives_exactly_the_following_batches(corpus):
    path_a, _, path_b, _ = corpus
    kwargs = {"weights": [2.0, 1.0], "seed": 3, "shuffle_buffer": 8}
    it = make_iter([path_a, path_b], **kwargs)
    reference, states = [], {}
    for step in range(40):
        if step in (0, 1, 7, 23):
            states[step] = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
        reference.append(next(it))
    for step, state in states.items():
        resumed = make_iter([path_a, path_b], **kwargs)
        resumed.set_state(state)
        for want in reference[step:step + 6]:
            got = next(resumed)
            for k in KEYS:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"resume at step {step}, key {k}")
    # Restoring an earlier state on the same, further advanced iterator rewinds it.
    it.set_state(states[7])
    np.testing.assert_array_equal(next(it)["tokens"], reference[7]["tokens"])


def test_state_from_another_pipeline_is_refused(corpus):
    path, _, _, _ = corpus
    state = make_iter([path], seed=1).get_state()
    other = make_iter([path], seed=2)
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a data-iterator state"):
        other.set_state({"next_index": 3})


def test_deterministic_given_seed(corpus):
    path_a, _, path_b, _ = corpus

    def first(seed):
        it = make_iter([path_a, path_b], seed=seed, shuffle_buffer=8)
        return np.concatenate([next(it)["tokens"] for _ in range(5)])

    np.testing.assert_array_equal(first(5), first(5))
    assert not np.array_equal(first(5), first(6))


def test_mixture_follows_weights(corpus):
    path_a, _, path_b, _ = corpus
    it = make_iter([path_a, path_b], weights=[3.0, 1.0], batch=8, seq_len=64, shuffle_buffer=0)
    from_b = total = 0
    for _ in range(60):
        tgt = next(it)["targets"]
        firsts = tgt[tgt >= 10]
        # Count documents by their first body token (J == 0): one per document that has a body.
        firsts = firsts[(firsts - 10) % 1000 == 0]
        from_b += int((doc_of(firsts) >= 500).sum())
        total += len(firsts)
    assert total > 300
    assert abs(from_b / total - 0.25) < 0.04, (from_b, total)


def test_processes_see_disjoint_shards(corpus):
    path, lengths, _, _ = corpus
    for shuffle in (False, True):
        docs = []
        for p in range(2):
            it = make_iter([path], num_epochs=1, shuffle=shuffle, global_batch_size=4, process_index=p,
                           process_count=2)
            batches = drain(it)
            assert all(b["tokens"].shape == (2, 32) for b in batches)
            tokens = np.concatenate([np.concatenate([b["tokens"].ravel(), b["targets"].ravel()]) for b in batches])
            docs.append({int(k) for k in doc_of(tokens[tokens >= 10])})
        assert docs[0].isdisjoint(docs[1])
        assert docs[0] | docs[1] == {k for k, n in lengths.items() if n > 0}


def test_multiple_epochs_reshuffle(corpus):
    path, lengths, _, _ = corpus
    batches = drain(make_iter([path], num_epochs=2, shuffle=True, shuffle_buffer=0, seq_len=64))
    pairs = check_rows(batches, 64)
    assert sum(len(p) for p in pairs) == 2 * sum(n + 1 for n in lengths.values())
    order = [doc_of(t) for p in pairs for _, t in p if t >= 10 and (t - 10) % 1000 == 0]
    half = len(order) // 2
    assert sorted(order[:half]) == sorted(order[half:]) and order[:half] != order[half:]


def test_bad_records_error_or_skip(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": "1_0 1_1"}), "{not json", json.dumps({"body": "x"}), json.dumps({"text": "2_0"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl line 2: not valid JSON"):
        drain(make_iter([path], num_epochs=1, shuffle=False))
    it = make_iter([path], num_epochs=1, shuffle=False, bad_records="skip")
    pairs = check_rows(drain(it), 32)
    check_documents(pairs, {1: 2, 2: 1})
    assert it.stats["skipped_records"] == 2


def test_pipeline_argument_errors(corpus):
    path, _, _, _ = corpus
    with pytest.raises(ConfigError, match="multiple of the process count"):
        make_iter([path], global_batch_size=3, process_count=2)
    with pytest.raises(ConfigError, match="process_index 2"):
        make_iter([path], process_index=2, process_count=2)
    with pytest.raises(ConfigError, match="fine-tuning data stage"):
        make_iter([path], kind="sft")


@pytest.mark.slow
def test_worker_processes_resume_exactly(corpus):
    path_a, _, path_b, _ = corpus
    kwargs = {"weights": [1.0, 1.0], "worker_count": 2, "shuffle_buffer": 4}
    with make_iter([path_a, path_b], **kwargs) as it:
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        want = [next(it) for _ in range(4)]
    with make_iter([path_a, path_b], **kwargs) as it:
        it.set_state(state)
        got = [next(it) for _ in range(4)]
    for g, w in zip(got, want):
        for k in KEYS:
            assert type(g[k]) is np.ndarray
            np.testing.assert_array_equal(g[k], w[k])
