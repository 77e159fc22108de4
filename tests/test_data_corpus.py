"""The synthetic corpus: deterministic, well-formed, and structured (context predicts much of it)."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import pytest

from internlm_jax.data import (
    ByteTokenizer,
    DataConfig,
    SourceConfig,
    build_pretrain_pipeline,
    unigram_entropy,
    write_synthetic_corpus,
)


def test_unigram_entropy_in_nats():
    assert unigram_entropy([[5, 5, 5, 5]]) == 0.0
    assert unigram_entropy([[1, 2], [3, 4]]) == pytest.approx(math.log(4))
    assert unigram_entropy([[1, 1, 1, 2]]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    with pytest.raises(ValueError, match="at least one token"):
        unigram_entropy([[], []])


def test_corpus_is_deterministic_and_valid_jsonl(tmp_path):
    a = write_synthetic_corpus(tmp_path / "a", n_docs=50, seed=1)
    b = write_synthetic_corpus(tmp_path / "b", n_docs=50, seed=1)
    c = write_synthetic_corpus(tmp_path / "c", n_docs=50, seed=2)
    def read(path):
        with open(path) as f:
            return f.read()

    assert read(a) == read(b) != read(c)
    docs = [json.loads(line) for line in read(a).splitlines()]
    assert len(docs) == 50 and all(isinstance(d["text"], str) and d["text"] for d in docs)
    text = " ".join(d["text"] for d in docs)
    for fragment in (" + ", " = ", " km = ", "after ", "the "):
        assert fragment in text
    with pytest.raises(ValueError, match="n_docs"):
        write_synthetic_corpus(tmp_path, n_docs=0, seed=0)


def test_corpus_has_learnable_structure(tmp_path):
    # Conditional entropy of the next byte given the previous three is far below the unigram entropy: a
    # model that reads context can push its loss well under the unigram baseline.
    path = write_synthetic_corpus(tmp_path, n_docs=400, seed=0)
    tok = ByteTokenizer()
    with open(path) as f:
        ids = [tok.encode(json.loads(line)["text"]) for line in f]
    h1 = unigram_entropy(ids)
    ctx: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
    for seq in ids:
        for i in range(3, len(seq)):
            ctx[tuple(seq[i - 3:i])][seq[i]] += 1
    total = sum(sum(c.values()) for c in ctx.values())
    h4 = -sum(n / total * math.log(n / sum(c.values())) for c in ctx.values() for n in c.values())
    assert h1 > 2.5 and h4 < 0.45 * h1, (h1, h4)
    # The corpus feeds the pre-training pipeline as is.
    it = build_pretrain_pipeline(DataConfig(sources=(SourceConfig(path),), seq_len=64), tok, global_batch_size=2,
                                 seed=0)
    assert next(it)["loss_mask"].sum() == 128
