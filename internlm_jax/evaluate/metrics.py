"""Metrics: accuracy, exact match, token F1, BLEU, ROUGE-L, pass@k. Own small implementations.

Text metrics tokenise by lower-cased words, with each CJK character its own token (Chinese has no spaces).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def accuracy(preds: Sequence[object], golds: Sequence[object]) -> float:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} references")
    return float(np.mean([p == g for p, g in zip(preds, golds)])) if preds else float("nan")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def f1(pred: str, ref: str) -> float:
    """Token-overlap F1 after SQuAD normalisation (CJK characters count as tokens)."""
    p, r = tokens(normalize_answer(pred)), tokens(normalize_answer(ref))
    if not p or not r:
        return float(p == r)
    common = collections.Counter(p) & collections.Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(toks: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(toks[i: i + n]) for i in range(len(toks) - n + 1))


def bleu(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], max_n: int = 4,
         smooth: bool = False) -> float:
    """Corpus BLEU (Papineni et al. 2002), 0..100: clipped n-gram precisions 1..max_n, geometric mean,
    brevity penalty against the closest reference length. `smooth` adds one to every count for n > 1
    (Lin & Och's add-one), useful for single sentences."""
    matches = [0] * max_n
    totals = [0] * max_n
    pred_len = ref_len = 0
    for pred, ref in zip(preds, refs):
        ref_list = [ref] if isinstance(ref, str) else list(ref)
        p = tokens(pred)
        rs = [tokens(r) for r in ref_list]
        pred_len += len(p)
        ref_len += min((abs(len(r) - len(p)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            pc = _ngrams(p, n)
            best: collections.Counter = collections.Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in pc.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if pred_len == 0:
        return 0.0
    logs = []
    for n in range(max_n):
        m, t = matches[n], totals[n]
        if smooth and n > 0:
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        logs.append(math.log(m / t))
    bp = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return 100.0 * bp * math.exp(sum(logs) / max_n)


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of tokens, 0..1."""
    p, r = tokens(pred), tokens(ref)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) from n samples with c correct,
    computed as a product to stay exact for large n."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
