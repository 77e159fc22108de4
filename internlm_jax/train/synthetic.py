"""Packed batches of a random bigram language, with the batch-source interface of the data pipeline.

For tests and benchmarks that must not depend on files or a tokenizer. Each token has `branch` possible
successors (fixed at random per seed), so a model can reach a loss near the chain's entropy rate
(`entropy_rate()`), far below the unigram entropy of the stream. Documents of random length are packed into
rows exactly like the real pipeline's output: segment ids 1, 2, ... per document and 0 for padding, positions
restarting per document, targets = the next token of the same document, loss_mask 0 on each document's last
token and on padding.

Batches are a pure function of (seed, step), so `get_state()` is just the step and resume is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SyntheticBatches:
    def __init__(self, vocab_size: int, seq_len: int, global_batch_size: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, branch: int = 4, doc_len: tuple[int, int] = (8, 48),
                 first_token: int = 3) -> None:
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} does not split over {process_count} processes")
        if vocab_size <= first_token + branch:
            raise ValueError(f"vocab_size {vocab_size} too small for a bigram language")
        self.vocab_size, self.seq_len, self.global_batch_size = vocab_size, seq_len, global_batch_size
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.doc_len = doc_len
        self.first = first_token
        rng = np.random.default_rng([seed, 7919])
        n = vocab_size - first_token
        self.successors = rng.integers(0, n, (n, branch)) + first_token  # [V', branch]
        p = rng.dirichlet(np.ones(branch) * 2.0, size=n)  # [V', branch] transition probs
        self.cum = np.cumsum(p, axis=1)
        self.probs = p
        self.step = 0

    def entropy_rate(self) -> float:
        """Conditional entropy per token in nats, averaged uniformly over current tokens (an estimate of the
        best achievable loss; the stationary distribution is not uniform, so this is approximate)."""
        p = self.probs
        return float(np.mean(-np.sum(p * np.log(p), axis=1)))

    def _rows(self, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
        T = self.seq_len
        tokens = np.zeros((rows, T + 1), np.int64)
        seg = np.zeros((rows, T + 1), np.int32)
        pos = np.zeros((rows, T + 1), np.int32)
        for r in range(rows):
            t, s = 0, 0
            while t < T + 1:
                n = int(rng.integers(self.doc_len[0], self.doc_len[1] + 1))
                n = min(n, T + 1 - t)
                s += 1
                cur = int(rng.integers(self.first, self.vocab_size))
                u = rng.random(n)
                for i in range(n):
                    tokens[r, t + i] = cur
                    j = int(np.searchsorted(self.cum[cur - self.first], u[i]))
                    cur = int(self.successors[cur - self.first, min(j, self.successors.shape[1] - 1)])
                seg[r, t:t + n] = s
                pos[r, t:t + n] = np.arange(n)
                t += n
        same_doc = seg[:, 1:] == seg[:, :-1]
        return {
            "tokens": tokens[:, :-1].astype(np.int32),
            "targets": np.where(same_doc, tokens[:, 1:], 0).astype(np.int32),
            "positions": pos[:, :-1],
            "segment_ids": seg[:, :-1],
            "loss_mask": same_doc.astype(np.float32),
        }

    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        full = self._rows(rng, self.global_batch_size)
        per = self.global_batch_size // self.process_count
        lo = self.process_index * per
        self.step += 1
        return {k: v[lo:lo + per] for k, v in full.items()}

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"iterator state is for seed {state.get('seed')}, this source has seed {self.seed}")
        self.step = int(state["step"])
