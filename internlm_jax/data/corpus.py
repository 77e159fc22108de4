"""A small synthetic English-ish corpus with learnable structure, generated on the fly.

Documents are short runs of templated facts: sums and differences ("12 + 7 = 19."), unit conversions
("3 km = 3000 m."), day/month successions ("after monday comes tuesday."), counting runs, and simple
sentences from a small vocabulary. Much of each document is predictable from its prefix, so a tiny model's
loss falls far below the unigram entropy of the text, which `unigram_entropy` measures (in nats per token,
the unit of a cross-entropy loss computed with natural logs).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
COLOURS = ["red", "blue", "green", "small", "big", "old"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse"]
VERBS = ["sees", "likes", "follows", "finds"]
THINGS = ["ball", "tree", "house", "river", "box"]
UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("h", "min", 60), ("min", "s", 60)]


def _sum(r: random.Random) -> str:
    a, b = r.randint(0, 20), r.randint(0, 20)
    return f"{a} + {b} = {a + b}."


def _difference(r: random.Random) -> str:
    a = r.randint(0, 20)
    b = r.randint(0, a)
    return f"{a} - {b} = {a - b}."


def _unit(r: random.Random) -> str:
    big, small, factor = r.choice(UNITS)
    n = r.randint(1, 9)
    return f"{n} {big} = {n * factor} {small}."


def _succession(r: random.Random) -> str:
    names = r.choice([DAYS, MONTHS])
    i = r.randrange(len(names))
    return f"after {names[i]} comes {names[(i + 1) % len(names)]}."


def _run(r: random.Random) -> str:
    names = r.choice([DAYS, MONTHS])
    i, n = r.randrange(len(names)), r.randint(3, 6)
    return " ".join(names[(i + k) % len(names)] for k in range(n)) + "."


def _count(r: random.Random) -> str:
    start, n = r.randint(1, 50), r.randint(4, 8)
    return " ".join(str(start + k) for k in range(n)) + "."


def _sentence(r: random.Random) -> str:
    return f"the {r.choice(COLOURS)} {r.choice(ANIMALS)} {r.choice(VERBS)} the {r.choice(THINGS)}."


FACTS: list[Callable[[random.Random], str]] = [_sum, _difference, _unit, _succession, _run, _count, _sentence]


def synthetic_document(r: random.Random, min_facts: int = 3, max_facts: int = 8) -> str:
    return " ".join(r.choice(FACTS)(r) for _ in range(r.randint(min_facts, max_facts)))


def write_synthetic_corpus(directory: str | os.PathLike[str], n_docs: int, seed: int,
                           filename: str = "corpus.jsonl") -> str:
    """Write `n_docs` documents as jsonl ({"text": ..., "id": i} per line); returns the file path.

    Deterministic: the same (n_docs, seed) always gives the same bytes.
    """
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), filename)
    r = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": synthetic_document(r), "id": i}) + "\n" for i in range(n_docs))
    return path


def unigram_entropy(token_lists: Iterable[Sequence[int]]) -> float:
    """Entropy of the token frequency distribution, in nats per token: -sum_v p(v) ln p(v).

    This is the loss of the best model that ignores context; a model that learns structure goes below it.
    """
    counts: Counter[int] = Counter()
    for tokens in token_lists:
        counts.update(int(t) for t in tokens)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("unigram_entropy needs at least one token")
    return -sum(c / total * math.log(c / total) for c in counts.values())
