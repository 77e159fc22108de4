"""A synthetic raw corpus with known duplicate clusters and known low-quality documents (tests, benchmark).

Distinct documents are sentences of words drawn from a Zipf-like vocabulary of made-up words (so two distinct
documents share almost no 5-grams). Planted: exact copies (whitespace/case changed), near copies (a few
percent of the words replaced) and junk that a named rule removes. `truth` maps each document id to its
cluster (the id of the original) so precision and recall of dedup can be measured.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

_LETTERS = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
_FREQ = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                  1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
_STOP = ["the", "of", "and", "to", "with", "that", "have", "be"]


class Generator:
    def __init__(self, seed: int = 0, vocab_size: int = 20000):
        self.rng = np.random.default_rng(seed)
        p = _FREQ / _FREQ.sum()
        lengths = np.clip(self.rng.poisson(4.5, vocab_size), 2, 12)
        words = {"".join(self.rng.choice(_LETTERS, size=n, p=p)) for n in lengths}
        self.vocab = np.array(sorted(words) + _STOP * 40)
        ranks = np.arange(1, len(self.vocab) + 1)
        self.rng.shuffle(self.vocab)
        self.p = 1.0 / ranks ** 0.9
        self.p /= self.p.sum()

    def words(self, n: int) -> list[str]:
        return list(self.rng.choice(self.vocab, size=n, p=self.p))

    def document(self, n_words: int) -> str:
        words = self.words(n_words)
        out, line = [], []
        for i, w in enumerate(words):
            line.append(w.capitalize() if not line else w)
            if len(line) >= 8 and self.rng.random() < 0.15 or i == len(words) - 1:
                out.append(" ".join(line) + ".")
                line = []
        paras = []
        for i in range(0, len(out), 5):
            paras.append(" ".join(out[i:i + 5]))
        return "\n\n".join(paras)

    def near_copy(self, text: str, frac: float) -> str:
        words = text.split(" ")
        n = max(1, int(len(words) * frac))
        for i in self.rng.choice(len(words), size=n, replace=False):
            words[i] = str(self.rng.choice(self.vocab))
        return " ".join(words)

    @staticmethod
    def exact_copy(text: str) -> str:
        return "  " + text.replace(" ", "  ", 3).upper() + "\n"   # same content hash after normalization


def junk_documents(gen: Generator) -> dict[str, str]:
    """One document per rule that should remove it (with the default FilterConfig)."""
    body = gen.document(120)
    return {
        "word_count": "Too short to keep.",
        "symbol_word_ratio": body + "\n" + " ".join(["#tag"] * 40),
        "digit_ratio": body[:200] + " " + " ".join(str(n) for n in gen.rng.integers(10**6, 10**9, 150)),
        "bullet_lines": "\n".join("• " + " ".join(gen.words(8)) for _ in range(40)),
        "duplicate_lines": "\n".join([" ".join(gen.words(9))] * 30 + [gen.document(60)]),
        "blocklist": body + " buy cheap viagra now",
        "script": "Это документ на русском языке, который не проходит фильтр письменности. " * 12,
    }


def write_corpus(out_dir: str, *, n_distinct: int = 200, n_clusters: int = 40, copies: int = 2,
                 near_frac: float = 0.02, words: tuple[int, int] = (150, 400), seed: int = 0,
                 files: int = 2, junk: bool = True) -> dict[str, Any]:
    """Write `files` jsonl files; return {paths, truth: {doc_id: cluster id}, junk: {doc_id: rule}, n_docs}.

    n_distinct distinct documents; the first n_clusters of them get `copies` planted copies each, alternating
    exact and near copies. Document ids are `d<i>` in the "id" field; records are shuffled across files.
    """
    gen = Generator(seed)
    records: list[dict[str, str]] = []
    truth: dict[str, str] = {}
    for i in range(n_distinct):
        text = gen.document(int(gen.rng.integers(*words)))
        oid = f"d{i}"
        records.append({"id": oid, "text": text})
        truth[oid] = oid
        if i < n_clusters:
            for c in range(copies):
                cid = f"d{i}c{c}"
                dup = gen.exact_copy(text) if c % 2 == 0 else gen.near_copy(text, near_frac)
                records.append({"id": cid, "text": dup})
                truth[cid] = oid
    junk_ids = {}
    if junk:
        for rule, text in junk_documents(gen).items():
            jid = f"junk_{rule}"
            records.append({"id": jid, "text": text})
            junk_ids[jid] = rule
    order = gen.rng.permutation(len(records))
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"part-{k:03d}.jsonl") for k in range(files)]
    handles = [open(p, "w", encoding="utf-8") for p in paths]  # noqa: SIM115  (closed in finally)
    try:
        for j, idx in enumerate(order):
            handles[j % files].write(json.dumps(records[idx], ensure_ascii=False) + "\n")
    finally:
        for h in handles:
            h.close()
    return {"paths": paths, "truth": truth, "junk": junk_ids, "n_docs": len(records)}


def write_sized_corpus(out_dir: str, megabytes: float, seed: int = 0, files: int = 8) -> dict[str, Any]:
    """About `megabytes` MB of jsonl with 5% exact and 5% near duplicates and 2% junk (the benchmark)."""
    gen = Generator(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"part-{k:03d}.jsonl") for k in range(files)]
    handles = [open(p, "w", encoding="utf-8") for p in paths]  # noqa: SIM115  (closed in finally)
    target, size, n, recent = megabytes * 1e6, 0, 0, []
    junk = list(junk_documents(gen).values())
    try:
        while size < target:
            r = gen.rng.random()
            if r < 0.05 and recent:
                text = gen.exact_copy(recent[int(gen.rng.integers(len(recent)))])
            elif r < 0.10 and recent:
                text = gen.near_copy(recent[int(gen.rng.integers(len(recent)))], 0.02)
            elif r < 0.12:
                text = junk[int(gen.rng.integers(len(junk)))]
            else:
                text = gen.document(int(gen.rng.integers(150, 700)))
                recent = (recent + [text])[-500:]
            line = json.dumps({"id": f"d{n}", "text": text}) + "\n"
            handles[n % files].write(line)
            size += len(line)
            n += 1
    finally:
        for h in handles:
            h.close()
    return {"paths": paths, "n_docs": n, "bytes": int(size)}
