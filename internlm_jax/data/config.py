"""Typed data-pipeline configuration: `SourceConfig` (one text source) and `DataConfig` (the whole pipeline).

Both are frozen dataclasses validated on construction. `DataConfig.from_dict` builds one from the `data:`
section of a YAML run config; unknown keys are errors that name the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal, get_args

from internlm_jax.config import ConfigError

SourceFormat = Literal["jsonl", "parquet", "array_record", "tokens", "auto"]
DataKind = Literal["pretrain", "sft", "dpo"]
BadRecordPolicy = Literal["error", "skip"]


def _nearest_key_error(where: str, key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else "."
    return ConfigError(f"unknown key {key!r} in {where}{hint} Valid keys: {', '.join(valid)}")


def _check_type(where: str, name: str, value: Any, expected: tuple[type, ...], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is an int subclass; a YAML `true` where a count is expected is a mistake, not 1.
    bad_bool = isinstance(value, bool) and bool not in expected
    if bad_bool or not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in expected) + (" or null" if allow_none else "")
        raise ConfigError(f"{where}.{name} must be {names}, got {value!r} ({type(value).__name__})")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One text source. `path` is a file, a directory (its files of the source's format, sorted) or a glob.

    `weight` is the relative share of *documents* drawn from this source in a mixture.
    """

    path: str
    format: SourceFormat = "auto"
    text_field: str = "text"
    weight: float = 1.0

    def __post_init__(self) -> None:
        where = f"source {self.path!r}"
        _check_type("source", "path", self.path, (str,))
        if not self.path:
            raise ConfigError("source.path is empty; give a file, a directory or a glob pattern")
        _check_type(where, "format", self.format, (str,))
        if self.format not in get_args(SourceFormat):
            raise ConfigError(f"{where}: format {self.format!r} is not one of {', '.join(get_args(SourceFormat))}")
        _check_type(where, "text_field", self.text_field, (str,))
        if not self.text_field:
            raise ConfigError(f"{where}: text_field is empty; name the record field holding the text")
        _check_type(where, "weight", self.weight, (int, float))
        if not self.weight > 0:
            raise ConfigError(f"{where}: weight must be > 0, got {self.weight}")
        object.__setattr__(self, "weight", float(self.weight))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> SourceConfig:
        """A dict with the field names, or a bare path string."""
        if isinstance(d, str):
            return cls(path=d)
        if not isinstance(d, dict):
            raise ConfigError(f"a data source must be a mapping or a path string, got {d!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in valid:
                raise _nearest_key_error("data.sources[]", str(key), valid)
        if "path" not in d:
            raise ConfigError(f"data source {d!r} has no 'path'")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data pipeline of a run.

    sources:        one or more text sources, mixed by weight.
    tokenizer:      tokenizer directory, or ""/"byte" for the byte tokenizer (resolved by the training
                    loop; the pipeline itself takes a tokenizer object).
    seq_len:        tokens per packed row (T).
    add_bos/eos:    wrap every document in BOS ... EOS before packing.
    shuffle:        shuffle documents globally (a fresh permutation per epoch, all sources are random-access)
                    and, if shuffle_buffer > 0, packed rows within windows of `shuffle_buffer` rows (spreads
                    the pieces of a long document over several batches; the first batch, and every
                    resume, re-packs up to one window of rows).
    num_epochs:     passes over each source; None repeats forever (stop training by step count).
    worker_count:   0 = read and tokenise in this process; N > 0 = N grain worker processes (the row order
                    depends on N, so resume with the same N).
    kind:           pretrain | sft | dpo (sft/dpo are built by the fine-tuning data stage).
    bad_records:    "error" stops at the first malformed record (file and line in the message); "skip" drops
                    it, logs it and counts it in `DataIterator.stats`.
    manifest:       manifest.json of a corpus made by `internlm-jax data prepare`: the sources become its
                    token shards (format "tokens") with its mixture weights, and the tokenizer must be the
                    one it was made with (empty tokenizer: taken from the manifest).
    """

    sources: tuple[SourceConfig, ...]
    tokenizer: str = ""
    seq_len: int = 512
    add_bos: bool = True
    add_eos: bool = True
    shuffle: bool = True
    shuffle_buffer: int = 256
    num_epochs: int | None = None
    worker_count: int = 0
    kind: DataKind = "pretrain"
    bad_records: BadRecordPolicy = "error"
    manifest: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.sources, SourceConfig):
            object.__setattr__(self, "sources", (self.sources,))
        if isinstance(self.sources, list):
            object.__setattr__(self, "sources", tuple(self.sources))
        if not isinstance(self.sources, tuple) or not self.sources:
            raise ConfigError("data.sources must list at least one source (a path or {path, format, text_field, "
                              "weight})")
        for s in self.sources:
            if not isinstance(s, SourceConfig):
                raise ConfigError(f"data.sources entries must be SourceConfig, got {s!r}")
        _check_type("data", "tokenizer", self.tokenizer, (str,))
        _check_type("data", "seq_len", self.seq_len, (int,))
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        for name in ("add_bos", "add_eos", "shuffle"):
            _check_type("data", name, getattr(self, name), (bool,))
        _check_type("data", "shuffle_buffer", self.shuffle_buffer, (int,))
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0 (0 = no row shuffle), got {self.shuffle_buffer}")
        _check_type("data", "num_epochs", self.num_epochs, (int,), allow_none=True)
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs must be >= 1 or null (repeat forever), got {self.num_epochs}")
        _check_type("data", "worker_count", self.worker_count, (int,))
        if self.worker_count < 0:
            raise ConfigError(f"data.worker_count must be >= 0, got {self.worker_count}")
        if self.kind not in get_args(DataKind):
            raise ConfigError(f"data.kind {self.kind!r} is not one of {', '.join(get_args(DataKind))}")
        if self.bad_records not in get_args(BadRecordPolicy):
            raise ConfigError(f"data.bad_records {self.bad_records!r} is not one of "
                              f"{', '.join(get_args(BadRecordPolicy))}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"the data config must be a mapping, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in valid:
                raise _nearest_key_error("data", str(key), valid)
        kwargs = dict(d)
        if kwargs.get("manifest"):
            _check_type("data", "manifest", kwargs["manifest"], (str,))
            derived, tokenizer = _from_manifest(kwargs["manifest"], kwargs.get("tokenizer", ""))
            if "sources" in kwargs and kwargs["sources"] not in (None, []):
                given = tuple(SourceConfig.from_dict(s) for s in (
                    [kwargs["sources"]] if isinstance(kwargs["sources"], (str, dict)) else kwargs["sources"]))
                if given != derived:
                    raise ConfigError("give either data.manifest or data.sources, not both: the manifest names "
                                      "its own shards and weights (set source weights when preparing)")
            kwargs.update(sources=derived, tokenizer=tokenizer)
            return cls(**kwargs)
        if "sources" not in kwargs:
            raise ConfigError("data.sources is required: list the text files (jsonl, parquet, array_record)")
        sources = kwargs["sources"]
        if isinstance(sources, (str, dict)):
            sources = [sources]
        if not isinstance(sources, (list, tuple)):
            raise ConfigError(f"data.sources must be a list, got {type(sources).__name__}")
        kwargs["sources"] = tuple(SourceConfig.from_dict(s) for s in sources)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sources"] = [s.to_dict() for s in self.sources]
        return d

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)


def _from_manifest(path: str, tokenizer: str) -> tuple[tuple[SourceConfig, ...], str]:
    """Token-shard sources and the tokenizer of a prepared corpus; errors on stale or missing shards and on
    a tokenizer other than the one the shards were made with."""
    import glob
    import hashlib
    import json
    import os

    if not os.path.isfile(path):
        raise ConfigError(f"data.manifest {path!r} does not exist; run `internlm-jax data prepare` first")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != "internlm-jax-prepared/1":
            raise ConfigError(f"data.manifest {path!r} has format {manifest.get('format')!r}, expected "
                              "'internlm-jax-prepared/1' (written by `internlm-jax data prepare`)")
        base = os.path.dirname(os.path.abspath(path))
        sources = []
        for name in manifest["source_order"]:
            src = manifest["sources"][name]
            listed = sorted(os.path.join(base, sh["path"]) for sh in src["shards"])
            if not listed:
                raise ConfigError(f"data.manifest {path!r}: source {name!r} kept no documents, so it cannot be "
                                  "mixed in; drop it from the prepare config or relax its filters")
            pattern = os.path.join(base, name, "*.array_record")
            found = sorted(glob.glob(pattern))
            if found != listed:
                missing, extra = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
                raise ConfigError(f"data.manifest {path!r}: the shard files of source {name!r} differ from the "
                                  f"manifest (missing: {missing[:3]}, not in the manifest: {extra[:3]})")
            sources.append(SourceConfig(path=pattern, format="tokens", weight=float(src["weight"])))
        made_with = manifest["tokenizer"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"data.manifest {path!r} is not a prepared-corpus manifest ({e!r})") from None
    if not tokenizer:
        return tuple(sources), made_with["spec"]
    if tokenizer == "byte" or made_with["sha256"] == "byte":
        same = tokenizer == "byte" and made_with["sha256"] == "byte"
    elif os.path.isfile(os.path.join(tokenizer, "tokenizer.model")):
        with open(os.path.join(tokenizer, "tokenizer.model"), "rb") as f:
            same = hashlib.sha256(f.read()).hexdigest() == made_with["sha256"]
    else:
        same = True  # not a tokenizer folder: the training loop reports that with its own message
    if not same:
        raise ConfigError(f"data.tokenizer {tokenizer!r} is not the tokenizer the shards of {path!r} were made "
                          f"with ({made_with['spec']!r}, sha256 {made_with['sha256'][:12]}...); token ids would "
                          "not match. Leave data.tokenizer empty to use that one")
    return tuple(sources), tokenizer
