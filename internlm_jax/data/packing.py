"""Tokenise documents into (input, target) pairs and turn packed rows into training rows.

Targets are made *before* packing (inputs = ids[:-1], targets = ids[1:] of each whole document), so a
document split across rows keeps every target: the token at the end of one piece still predicts the first
token of the next piece. A document of n tokens therefore gives n - 1 (input, target) pairs, all with
loss_mask 1; the last token of a document (EOS when add_eos) appears only as a target.

Packing itself is grain's ConcatThenSplit: documents are concatenated into rows of T pairs and split
where a row fills. Positions restart at 0 for every piece, continuation pieces included (as MaxText
does): a piece cannot attend to the earlier part of its document, so it is treated as a document of its
own. Segment ids number the pieces of a row 1, 2, 3, ...; 0 marks padding.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from internlm_jax.data.sources import DataError, TextSource

log = logging.getLogger(__name__)

IGNORE = -1  # target value where there is no target (padding)


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = ...) -> list[int]: ...


class Counters:
    """Per-process counts of dropped input, shared by a source reader and the tokeniser map."""

    def __init__(self) -> None:
        self.skipped_records = 0
        self.short_documents = 0
        self._lock = threading.Lock()

    def add(self, name: str) -> int:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
            return getattr(self, name)

    def as_dict(self) -> dict[str, int]:
        return {"skipped_records": self.skipped_records, "short_documents": self.short_documents}

    def __getstate__(self) -> dict[str, Any]:
        return {"skipped_records": self.skipped_records, "short_documents": self.short_documents}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class SkippingSource:
    """Wraps a TextSource: with skip=True a bad record becomes None (dropped downstream), logged and counted."""

    def __init__(self, source: TextSource, skip: bool, counters: Counters):
        self.source, self.skip, self.counters = source, skip, counters

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> str | None:
        try:
            return self.source[index]
        except DataError as e:
            if not self.skip:
                raise
            n = self.counters.add("skipped_records")
            if n <= 10 or n % 1000 == 0:
                log.warning("skipping bad record (%d skipped so far in this process): %s", n, e)
            return None


class TokenizeDocument:
    """text -> {"inputs": int32[n-1], "targets": int32[n-1]} for the n ids of BOS + text + EOS."""

    def __init__(self, tokenizer: TokenizerLike, add_bos: bool, add_eos: bool, counters: Counters):
        self.tokenizer, self.add_bos, self.add_eos, self.counters = tokenizer, add_bos, add_eos, counters

    def __call__(self, text: str | np.ndarray | None) -> dict[str, np.ndarray] | None:
        if text is None:
            return None
        if isinstance(text, np.ndarray):  # already tokenized (a prepared shard): only BOS/EOS are added here
            ids = ([self.tokenizer.bos_id] if self.add_bos else []) + text.tolist()
        else:
            ids = list(self.tokenizer.encode(text, add_bos=self.add_bos))
        if self.add_eos:
            ids.append(self.tokenizer.eos_id)
        if len(ids) < 2:
            # One token has nothing to predict; without BOS/EOS an empty text gives no tokens at all.
            n = self.counters.add("short_documents")
            if n <= 10:
                log.warning("dropping a document of %d token(s): it has no (input, target) pair "
                            "(%d such documents so far in this process)", len(ids), n)
            return None
        arr = np.asarray(ids, dtype=np.int32)
        return {"inputs": arr[:-1], "targets": arr[1:]}


def finalize_row(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """A grain-packed row (inputs, targets, *_segment_ids, *_positions) -> the training row of length T."""
    seg = row["inputs_segment_ids"].astype(np.int32)  # [T]
    valid = seg > 0
    return {
        "tokens": np.where(valid, row["inputs"], pad_id).astype(np.int32),
        "targets": np.where(valid, row["targets"], IGNORE).astype(np.int32),
        "positions": np.where(valid, row["inputs_positions"], 0).astype(np.int32),
        "segment_ids": seg,
        "loss_mask": valid.astype(np.float32),
    }


class StackAndPad:
    """Stack rows into a batch of exactly `batch_size` rows; a short final batch gets all-padding rows."""

    def __init__(self, batch_size: int, pad_id: int):
        self.batch_size, self.pad_id = batch_size, pad_id

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        missing = self.batch_size - len(rows)
        if missing:
            fill = {"tokens": self.pad_id, "targets": IGNORE, "positions": 0, "segment_ids": 0, "loss_mask": 0}
            batch = {k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill[k], v.dtype)])
                     for k, v in batch.items()}
        return batch

