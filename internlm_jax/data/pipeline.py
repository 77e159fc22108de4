"""The pre-training (and continued pre-training) data pipeline on grain.

Per source:  records -> global shuffle (fresh permutation each epoch) -> repeat num_epochs (None: forever)
             -> this process's shard (every process_count-th record of the shuffled stream, starting at
             process_index: processes see disjoint records and together cover each epoch once)
             -> tokenise into (input, target) pairs (see packing.py).
Then:        weighted mixture of the sources (grain mix: a fixed interleave of *documents* in proportion
             to the weights; with num_epochs set, it ends when the first source runs out)
             -> pack into rows of seq_len with ConcatThenSplit -> training rows
             -> optional window shuffle of rows -> batches of global_batch_size // process_count rows
             (a short last batch, possible only with num_epochs set, is filled with padding rows)
             -> optional worker processes.

Everything before packing is index-addressed, so the iterator state is a few integers; the state is
JSON-serialisable and restores exactly the batches that would have come next. Deterministic given seed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Self

import grain
import numpy as np

from internlm_jax.config import ConfigError
from internlm_jax.data.config import DataConfig
from internlm_jax.data.packing import (
    Counters,
    SkippingSource,
    StackAndPad,
    TokenizeDocument,
    TokenizerLike,
    finalize_row,
)
from internlm_jax.data.sources import open_source

STATE_FORMAT = 1


def _derive_seed(seed: int, *tags: int) -> int:
    return int(np.random.SeedSequence([seed % 2**32, *tags]).generate_state(1)[0])


class DataIterator:
    """Iterator of this process's batches: dicts of numpy arrays, each [B, T] with B = local batch size.

    tokens int32, targets int32 (-1 on padding), positions int32 (restart at 0 per document piece),
    segment_ids int32 (1, 2, ... per piece in the row, 0 on padding), loss_mask float32 (1 where the
    target counts). `get_state()` / `set_state()` checkpoint the position in the stream.
    """

    def __init__(self, dataset: grain.IterDataset, fingerprint: dict[str, Any], counters: Counters,
                 batch_size: int, seq_len: int):
        self._dataset, self._fingerprint, self._counters = dataset, fingerprint, counters
        self.batch_size, self.seq_len = batch_size, seq_len
        self._iter = iter(dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        # Worker processes hand back shared-memory ndarray subclasses; give the caller plain arrays.
        return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}

    @property
    def stats(self) -> dict[str, int]:
        """Records skipped as bad (bad_records="skip") and documents too short to give a target, counted in
        this process since the iterator was built (read-ahead included; worker processes log their own)."""
        return self._counters.as_dict()

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "pipeline": self._fingerprint, "grain": _encode(self._iter.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "grain" not in state:
            raise ValueError(f"not a data-iterator state of format {STATE_FORMAT}: keys "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        saved = state.get("pipeline", {})
        diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._fingerprint.items()
                 if saved.get(k) != v]
        if diffs:
            raise ValueError("the saved data-iterator state belongs to a different data pipeline, so resuming "
                             "would not give the batches the run would have seen (" + "; ".join(diffs) + "). "
                             "Resume with the same data config, seed, batch size and process layout.")
        self._iter.set_state(_decode(state["grain"]))

    def close(self) -> None:
        """Stop worker processes (if any). Dropping the grain iterator here, not at interpreter exit, lets
        its shared-memory buffers be released while the modules they need still exist."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()
        self._iter = _Closed()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Closed:
    def __next__(self) -> dict[str, np.ndarray]:
        raise RuntimeError("this DataIterator was closed")

    def get_state(self) -> dict[str, Any]:
        raise RuntimeError("this DataIterator was closed; take its state before closing it")

    set_state = get_state


def build_pretrain_pipeline(config: DataConfig, tokenizer: TokenizerLike, *, global_batch_size: int, seed: int,
                            process_index: int = 0, process_count: int = 1) -> DataIterator:
    """Packed pre-training batches for this process; see the module docstring for the stages."""
    if config.kind != "pretrain":
        raise ConfigError(f"build_pretrain_pipeline builds kind 'pretrain' data, but data.kind is {config.kind!r}; "
                          "SFT and DPO data come from the fine-tuning data stage")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(f"global_batch_size {global_batch_size} must be a positive multiple of the process "
                          f"count {process_count} (each process loads an equal share of the rows)")
    local_batch = global_batch_size // process_count
    counters = Counters()
    tokenize = TokenizeDocument(tokenizer, config.add_bos, config.add_eos, counters)

    datasets, lengths = [], []
    for i, source_config in enumerate(config.sources):
        source = open_source(source_config)
        lengths.append(len(source))
        if len(source) * (config.num_epochs or process_count) < process_count:
            raise ConfigError(f"source {source_config.path!r} has {len(source)} records, fewer than the "
                              f"{process_count} processes that would share it")
        ds = grain.MapDataset.source(SkippingSource(source, config.bad_records == "skip", counters))
        if config.shuffle:
            ds = ds.shuffle(seed=_derive_seed(seed, 1, i))
        ds = ds.repeat(config.num_epochs)
        ds = ds[process_index::process_count]
        datasets.append(ds.map(tokenize))
    if len(datasets) == 1:
        docs = datasets[0]
    else:
        docs = grain.MapDataset.mix(datasets, weights=[s.weight for s in config.sources])

    # Synchronous reads in this process (or in each worker when worker_count > 0): the order and the state
    # stay simple, and parallelism comes from worker processes instead of GIL-bound threads.
    rows = docs.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    rows = grain.experimental.ConcatThenSplitIterDataset(
        rows, length_struct={"inputs": config.seq_len, "targets": config.seq_len})
    rows = rows.map(functools.partial(finalize_row, pad_id=int(tokenizer.pad_id)))
    if config.shuffle and config.shuffle_buffer > 0:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=config.shuffle_buffer,
                                                           seed=_derive_seed(seed, 2))
    batches = rows.batch(local_batch, drop_remainder=False, batch_fn=StackAndPad(local_batch, int(tokenizer.pad_id)))
    if config.worker_count > 0:
        _ensure_absl_flags_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))

    fingerprint = {
        # Paths are left out (data may be mounted elsewhere on resume); record counts catch changed files.
        "sources": [{"format": s.format, "text_field": s.text_field, "weight": s.weight, "records": n}
                    for s, n in zip(config.sources, lengths)],
        "seq_len": config.seq_len,
        "add_bos": config.add_bos, "add_eos": config.add_eos, "shuffle": config.shuffle,
        "shuffle_buffer": config.shuffle_buffer, "num_epochs": config.num_epochs,
        "worker_count": config.worker_count, "seed": seed, "global_batch_size": global_batch_size,
        "process_index": process_index, "process_count": process_count,
    }
    return DataIterator(batches, fingerprint, counters, local_batch, config.seq_len)


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; a program that never ran absl.app has not parsed them, and
    # grain then fails with UnparsedFlagAccessError. Mark them parsed so their defaults apply.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# Grain states hold tuples (packing's slices) that JSON would turn into lists; keep them tuples.
def _encode(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _encode(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v) for v in x]}
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, (np.integer, np.bool_, np.floating)):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, bytes):
        return {"__bytes__": x.decode("latin-1")}
    raise TypeError(f"cannot store {type(x).__name__} in a JSON data-iterator state: {x!r}")


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_decode(v) for v in x["__tuple__"])
        if set(x) == {"__bytes__"}:
            return x["__bytes__"].encode("latin-1")
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x

