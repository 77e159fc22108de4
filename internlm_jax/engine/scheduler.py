"""Continuous-batching scheduler: slots, chunked prefill under a token budget, preemption, prefix reuse.

Each step it builds a list of rows, one per sequence that runs this step:
  1. every running sequence, oldest first: a decode (1 token) or the next chunk of its prefill (at most
     `chunk_size` tokens and what is left of the step's token budget). If its pages cannot be allocated,
     the newest running sequence is preempted (pages freed, put back at the head of the queue, recomputed
     from its tokens later; prefix caching usually gives most pages back) until they can.
  2. waiting sequences, in arrival order, into free slots while budget and pages last; a new sequence
     first takes every cached full page of its tokens (prefix cache) and only computes the rest.
A sequence's state is just its token list and how many of those tokens have K/V in its pages
(`num_computed`); the last chunk of a prefill and every decode sample one new token.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from typing import Any

from internlm_jax.engine.pages import ROOT_HASH, PageAllocator, page_hashes
from internlm_jax.sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sample stream of a request (a request with n > 1 has n of them)."""

    seq_id: int
    request: Any  # engine.Request
    index: int  # sample index within the request
    tokens: list[int]
    prompt_len: int
    sampling: SamplingParams
    seed: int
    parent: "Sequence | None" = None  # n > 1: children wait for the first sample's prompt pages
    hash_root: bytes = ROOT_HASH  # start of the prefix-hash chain: also keys the rotation its pages hold
    status: str = WAITING
    num_computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # prefix hashes of full pages of tokens
    registered: int = 0  # leading pages already offered to the prefix cache
    slot: int | None = None
    admit_order: int = -1
    prefill_done: bool = False
    cached_tokens: int = 0  # prefix-cache hits at first admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    grammar: Any = None  # grammar.GrammarMatcher of a constrained sequence (advanced by the engine)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return len(self.tokens) - self.num_computed

    def full_page_hashes(self, num_pages: int, page_size: int) -> list[bytes]:
        if len(self.hashes) < num_pages:
            start = self.hashes[-1] if self.hashes else self.hash_root
            self.hashes += page_hashes(self.tokens, page_size, num_pages, start, len(self.hashes))
        return self.hashes[:num_pages]


@dataclasses.dataclass
class Row:
    """One sequence's work in a step: feed tokens[start:start+n]; sample after them if `sample`."""

    seq: Sequence
    start: int
    n: int
    sample: bool


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    chunk_size: int  # longest prefill chunk
    chunked_prefill: bool  # False: a prompt is fed whole in one step (at least one prompt per step)
    max_prefill_rows: int
    page_size: int
    enable_prefix_caching: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator):
        self.config = config
        self.alloc = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, oldest first
        self.free_slots: list[int] = list(range(config.max_num_seqs - 1, -1, -1))
        self._admit_counter = itertools.count()
        self.num_preemptions = 0
        self.prefill_tokens = 0  # tokens fed as prefill (prompt or recompute) so far
        self.decode_tokens = 0
        self.admitted: list[Sequence] = []  # admitted by the last schedule() (their slots need fresh state)

    # ---- queue operations -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence for good and give back its pages and slot at once."""
        if seq.status == FINISHED:
            return
        if seq.status == WAITING:
            self.waiting.remove(seq)
        else:
            self._release(seq)
            self.running.remove(seq)
        seq.status = FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        self.alloc.release(seq.pages)
        seq.pages = []
        seq.registered = 0
        seq.num_computed = 0
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's pages and slot; it is recomputed from its tokens when readmitted."""
        self._release(seq)
        self.running.remove(seq)
        seq.status = WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------------
    def _grow(self, seq: Sequence, upto: int) -> bool:
        """Make seq's pages cover `upto` tokens; False (nothing taken) if the pool is short."""
        need = -(-upto // self.config.page_size) - len(seq.pages)
        if need <= 0:
            return True
        pages = self.alloc.allocate(need)
        if pages is None:
            return False
        seq.pages += pages
        return True

    def _chunk(self, seq: Sequence, budget: int, prefill_rows: int) -> int:
        """Tokens seq feeds this step: 1 for a decode, else a prefill chunk (0 = wait for a later step)."""
        if seq.remaining == 1:
            return 1
        if prefill_rows >= self.config.max_prefill_rows:
            return 0
        if not self.config.chunked_prefill:
            return seq.remaining if prefill_rows == 0 or budget >= seq.remaining else 0
        return max(0, min(seq.remaining, self.config.chunk_size, budget))

    def schedule(self) -> list[Row]:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        rows: list[Row] = []
        self.admitted = []
        prefill_rows = 0
        for seq in list(self.running):
            if seq.status != RUNNING:  # preempted earlier in this loop
                continue
            n = self._chunk(seq, budget, prefill_rows)
            if n == 0:
                continue
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status != RUNNING:
                continue
            rows.append(Row(seq, seq.num_computed, n, seq.num_computed + n == len(seq.tokens)))
            budget -= n
            prefill_rows += n > 1

        for seq in list(self.waiting):
            if not self.free_slots or prefill_rows >= cfg.max_prefill_rows:
                break
            if budget <= 0 and (cfg.chunked_prefill or prefill_rows > 0):
                break
            if seq.parent is not None and not (seq.parent.prefill_done or seq.parent.status == FINISHED):
                continue  # n > 1: let the first sample compute the prompt pages, then share them
            n = self._admit(seq, budget, prefill_rows)
            if n == 0:
                break
            rows.append(Row(seq, seq.num_computed, n, seq.num_computed + n == len(seq.tokens)))
            budget -= n
            prefill_rows += n > 1
        return rows

    def _admit(self, seq: Sequence, budget: int, prefill_rows: int) -> int:
        """Take prefix hits, pages for the first chunk and a slot; the chunk length (0 = cannot admit now)."""
        cfg = self.config
        hits: list[int] = []
        if cfg.enable_prefix_caching or seq.parent is not None:
            # Full pages strictly before the last token: at least one token is always computed (its logits
            # give the next token), and shared pages are never written.
            shareable = (len(seq.tokens) - 1) // cfg.page_size
            hits = self.alloc.lookup(seq.full_page_hashes(shareable, cfg.page_size), count_stats=False)
        seq.pages = list(hits)
        seq.num_computed = len(hits) * cfg.page_size
        seq.registered = len(hits)
        n = self._chunk(seq, budget, prefill_rows)
        if n == 0 or not self._grow(seq, seq.num_computed + n):
            self.alloc.release(seq.pages)
            seq.pages, seq.num_computed, seq.registered = [], 0, 0
            return 0
        if seq.num_preemptions == 0 and not seq.prefill_done:  # first admission: prefix-cache statistics
            seq.cached_tokens = len(hits) * cfg.page_size
            self.alloc.query_tokens += len(seq.tokens)
            self.alloc.hit_tokens += seq.cached_tokens
        self.waiting.remove(seq)
        seq.slot = self.free_slots.pop()
        seq.status = RUNNING
        seq.admit_order = next(self._admit_counter)
        self.running.append(seq)
        self.admitted.append(seq)
        return n

    def after_step(self, rows: list[Row]) -> None:
        """Account the fed tokens and offer newly completed full pages to the prefix cache."""
        ps = self.config.page_size
        for r in rows:
            seq = r.seq
            seq.num_computed = r.start + r.n
            if r.n > 1 or not seq.prefill_done:
                self.prefill_tokens += r.n
            else:
                self.decode_tokens += r.n
            if seq.num_computed >= seq.prompt_len:
                seq.prefill_done = True
            full = seq.num_computed // ps
            if full > seq.registered:
                for page, h in zip(seq.pages[seq.registered:full],
                                   seq.full_page_hashes(full, ps)[seq.registered:full]):
                    self.alloc.register(page, h)
                seq.registered = full
