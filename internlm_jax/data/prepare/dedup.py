"""Exact and near-duplicate detection: content hashes, MinHash signatures and LSH bands, clusters.

Exact: documents whose normalized text, lower-cased with whitespace collapsed, has the same BLAKE2b hash form
a cluster. Near: a datasketch MinHash over word n-gram shingles (fixed seed); the signature is cut into
`bands` bands of `rows` values; documents sharing any band bucket are linked (to the smallest key of the
bucket), and the connected components are the clusters (union-find). Each cluster keeps its smallest key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np

from internlm_jax.data.prepare.config import NearDedupConfig
from internlm_jax.data.prepare.filters import SHINGLE_WORD_RE

_WS_RE = re.compile(r"\s+")


def content_hash(text: str) -> bytes:
    canon = _WS_RE.sub(" ", text.lower()).strip()
    return hashlib.blake2b(canon.encode("utf-8"), digest_size=16).digest()


def lsh_shape(cfg: NearDedupConfig) -> tuple[int, int]:
    """(bands, rows): as configured, or datasketch's optimum for the threshold and num_perm."""
    if cfg.bands:
        return cfg.bands, cfg.rows
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    return int(lsh.b), int(lsh.r)


def shingles(text: str, n: int) -> list[bytes]:
    words = SHINGLE_WORD_RE.findall(text.lower())
    if len(words) < n:
        return [" ".join(words).encode("utf-8")] if words else []
    return sorted({" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)})


class MinHasher:
    """Signatures and LSH band keys with a fixed seed: the same text gives the same keys on any machine."""

    def __init__(self, cfg: NearDedupConfig):
        from datasketch import MinHash

        self.cfg = cfg
        self.bands, self.rows = lsh_shape(cfg)
        self._template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)

    def signature(self, text: str) -> np.ndarray:
        from datasketch import MinHash

        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, permutations=self._template.permutations,
                    scheme=self._template.scheme)
        sh = shingles(text, self.cfg.ngram)
        if sh:
            m.update_batch(sh)
        return np.asarray(m.hashvalues)

    def band_keys(self, text: str) -> list[bytes]:
        """One bucket key per band: band index + a hash of that band's signature values. Empty texts get none."""
        if not SHINGLE_WORD_RE.search(text):
            return []
        sig = self.signature(text).astype("<u8")
        keys = []
        for b in range(self.bands):
            part = sig[b * self.rows:(b + 1) * self.rows].tobytes()
            keys.append(b.to_bytes(2, "big") + hashlib.blake2b(part, digest_size=12).digest())
        return keys


def jaccard(a: str, b: str, n: int) -> float:
    """The exact Jaccard similarity of two texts' shingle sets (for tests and reports)."""
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / max(len(sa | sb), 1)


def bucket_edges(keys: Iterable[str]) -> list[tuple[str, str]]:
    """Members of one LSH bucket -> (member, smallest member) edges."""
    ordered = sorted(set(keys))
    return [(k, ordered[0]) for k in ordered[1:]]


def clusters(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Connected components of the edges, each sorted (its first key is the one kept), sorted by first key."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            parent[hi] = lo
            parent.setdefault(lo, lo)
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])
