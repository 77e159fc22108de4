"""Host-side bookkeeping of the KV page pool: free list, refcounts, and the prefix cache.

A page is in exactly one of three states:
  - free:      on the free list, holds nothing useful;
  - in use:    refcount > 0 (one per sequence whose page table holds it);
  - cached:    refcount 0 but registered under a prefix hash; reusable by a later request with the same
               prefix, evicted least-recently-released first when the free list runs dry.

Prefix hash of a full page i of a sequence = blake2b(hash of page i-1 || the page's token ids), so it keys
all tokens from the start of the sequence up to the page's end. Only full pages are ever shared; a
sequence never writes into a page it did not allocate itself.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from internlm_jax.config import ConfigError

ROOT_HASH = b"internlm-jax-prefix-root"


def page_hashes(tokens: Sequence[int], page_size: int, num_pages: int, start: bytes = ROOT_HASH,
                first: int = 0) -> list[bytes]:
    """Chained hashes of full pages first..num_pages-1 of `tokens` (`start` = hash of page first-1)."""
    out = []
    prev = start
    for i in range(first, num_pages):
        chunk = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64)
        if chunk.shape[0] != page_size:
            raise ValueError(f"page {i} is not full ({chunk.shape[0]} of {page_size} tokens)")
        prev = hashlib.blake2b(prev + chunk.tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


class PageAllocator:
    """Free list + refcounts + prefix-hash table with LRU eviction of unreferenced cached pages."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ConfigError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcount = np.zeros(num_pages, np.int32)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._hash_of: dict[int, bytes] = {}  # page -> prefix hash (registered pages only)
        self._page_of: dict[bytes, int] = {}  # prefix hash -> page
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached pages with refcount 0, LRU first
        self.hit_tokens = 0
        self.query_tokens = 0
        self.evictions = 0

    # ---- capacity ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages that an allocation can take now (free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._page_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    # ---- allocation -------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (refcount 1), evicting LRU cached pages if needed; None (and nothing taken) if short."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.evictions += 1
            self.refcount[page] = 1
            out.append(page)
        return out

    def retain(self, pages: Sequence[int]) -> None:
        """One more reference to each page (a sequence sharing them)."""
        for p in pages:
            if self.refcount[p] == 0:
                if p not in self._evictable:
                    raise RuntimeError(f"page {p} is free; only in-use or cached pages can be shared")
                del self._evictable[p]
            self.refcount[p] += 1

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference per page; unreferenced pages become cached (if registered) or free."""
        for p in reversed(pages):  # deepest page first: the LRU evicts a prefix's tail before its head
            if self.refcount[p] <= 0:
                raise RuntimeError(f"page {p} released more often than it was taken")
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                if p in self._hash_of:
                    self._evictable[p] = None
                else:
                    self._free.append(p)

    # ---- prefix cache -----------------------------------------------------------------------------
    def register(self, page: int, h: bytes) -> None:
        """Record that in-use `page` holds the full page whose prefix hash is h (first writer wins)."""
        if h in self._page_of or page in self._hash_of:
            return
        self._page_of[h] = page
        self._hash_of[page] = h

    def lookup(self, hashes: Sequence[bytes], count_stats: bool = True) -> list[int]:
        """The longest run of cached pages matching `hashes` from the start; each is retained for the caller."""
        hits = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            hits.append(page)
        self.retain(hits)
        if count_stats:
            self.query_tokens += len(hashes) * self.page_size
            self.hit_tokens += len(hits) * self.page_size
        return hits

    def hit_rate(self) -> float:
        """Fraction of admitted prompt tokens whose K/V came from the prefix cache."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def clear_cache(self) -> None:
        """Forget every unreferenced cached page (they return to the free list)."""
        for p in list(self._evictable):
            del self._page_of[self._hash_of.pop(p)]
            self._free.append(p)
        self._evictable.clear()

    def check_invariants(self) -> None:
        """Every page is exactly one of free / in use / cached-unreferenced (a test and debug aid)."""
        free = set(self._free)
        ev = set(self._evictable)
        used = {int(p) for p in np.nonzero(self.refcount > 0)[0]}
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        if free & ev or free & used or ev & used:
            raise AssertionError("a page is in two states at once")
        if len(free) + len(ev) + len(used) != self.num_pages:
            raise AssertionError(f"lost pages: {self.num_pages - len(free) - len(ev) - len(used)}")
        if any(p not in self._hash_of for p in ev):
            raise AssertionError("an evictable page has no hash")
