"""Typed config of `internlm-jax data prepare`, read with the run-config mechanism (YAML + key=value overrides).

    cfg = load_prepare_config("configs/data/tiny_prepare.yaml", ["dedup.near.threshold=0.7"])

Every filter threshold can be null (that rule is off). A source may override some filter thresholds
(`filter_overrides: {min_mean_word_length: null}` for a Chinese source, where Gopher's English word rules do
not apply); the override keys are checked against `FilterConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any, Literal

from internlm_jax.config import ConfigError

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner", "PrismRunner")
SCRIPTS = ("latin", "han", "kana", "hangul", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One raw input: jsonl or parquet, a file, a directory or a glob (local, or any Beam filesystem)."""

    name: str
    path: str
    format: Literal["jsonl", "parquet", "auto"] = "auto"
    text_field: str = "text"
    weight: float = 1.0
    filter_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"source name {self.name!r} must be letters, digits, '_', '-' or '.' (it names the "
                              "shard folder)")
        if not self.path:
            raise ConfigError(f"source {self.name!r}: path is empty; give a file, a directory or a glob")
        if not self.text_field:
            raise ConfigError(f"source {self.name!r}: text_field is empty")
        if not self.weight > 0:
            raise ConfigError(f"source {self.name!r}: weight must be > 0, got {self.weight}")
        valid = [f.name for f in dataclasses.fields(FilterConfig)]
        for key in self.filter_overrides:
            if key not in valid:
                near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
                raise ConfigError(f"source {self.name!r}: unknown filter_overrides key {key!r}"
                                  + (f"; did you mean {near[0]!r}?" if near else f" (valid: {', '.join(valid)})"))


@dataclasses.dataclass(frozen=True)
class NormalizeConfig:
    """Applied to every document before filtering, dedup and tokenizing (the tokens are of this text).

    unicode_form: NFC keeps full-width CJK punctuation; NFKC folds compatibility characters.
    Line endings become "\\n", control and zero-width characters are dropped, trailing spaces of each line are
    removed, runs of more than `max_blank_lines` blank lines are shortened, and the text is stripped.
    """

    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    max_blank_lines: int = 1

    def __post_init__(self) -> None:
        if self.max_blank_lines < 0:
            raise ConfigError(f"normalize.max_blank_lines must be >= 0, got {self.max_blank_lines}")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Quality rules (Gopher / C4 style), applied in this order; a document is removed by the first that fails.

    Words are whitespace-separated tokens, except that each CJK character is one word.
    """

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1      # ('#' + '...' + '…') per word
    max_symbol_char_ratio: float | None = 0.25     # non-alphanumeric, non-space characters per non-space char
    max_digit_ratio: float | None = 0.2            # digits per non-space character
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8      # words with at least one letter
    min_stop_words: int | None = None              # Gopher's English stop words; null for non-English sources
    max_duplicate_line_ratio: float | None = 0.3
    max_duplicate_line_char_ratio: float | None = 0.2
    max_top_ngram_char_ratio: dict[int, float] = dataclasses.field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    max_duplicate_ngram_char_ratio: dict[int, float] = dataclasses.field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    scripts: tuple[str, ...] = ("latin", "han")    # the language/script filter; () turns it off
    min_script_ratio: float = 0.7                  # letters in the allowed scripts per letter
    blocklist: tuple[str, ...] = ()                # words or phrases, case-insensitive, whole-word match
    blocklist_file: str = ""                       # one term per line ('#' comments)

    def __post_init__(self) -> None:
        for name in ("max_symbol_word_ratio", "max_symbol_char_ratio", "max_digit_ratio",
                     "max_bullet_lines_ratio", "max_ellipsis_lines_ratio", "min_alpha_words_ratio",
                     "max_duplicate_line_ratio", "max_duplicate_line_char_ratio", "min_script_ratio"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"filters.{name} is a ratio in [0, 1], got {v}")
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ConfigError(f"filters.min_words {self.min_words} > max_words {self.max_words}")
        for name in ("max_top_ngram_char_ratio", "max_duplicate_ngram_char_ratio"):
            table = getattr(self, name)
            for n, v in table.items():
                n = int(n)
                if n < 1 or not 0.0 <= v <= 1.0:
                    raise ConfigError(f"filters.{name}: n-gram size {n} must be >= 1 and its ratio in [0, 1], got {v}")
            object.__setattr__(self, name, {int(n): float(v) for n, v in table.items()})
        for s in self.scripts:
            if s not in SCRIPTS:
                near = difflib.get_close_matches(s, SCRIPTS, n=1)
                raise ConfigError(f"filters.scripts: unknown script {s!r}" + (f"; did you mean {near[0]!r}?" if near
                                                                               else f" (known: {', '.join(SCRIPTS)})"))


@dataclasses.dataclass(frozen=True)
class NearDedupConfig:
    """MinHash LSH over word n-gram shingles (datasketch). bands x rows must equal num_perm; with both 0 they
    are chosen by datasketch's MinHashLSH for `threshold` (it weighs false positives and negatives equally)."""

    enabled: bool = True
    num_perm: int = 128
    threshold: float = 0.8
    bands: int = 0
    rows: int = 0
    ngram: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if self.num_perm < 2:
            raise ConfigError(f"dedup.near.num_perm must be >= 2, got {self.num_perm}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"dedup.near.threshold must be in (0, 1), got {self.threshold}")
        if (self.bands == 0) != (self.rows == 0):
            raise ConfigError("dedup.near.bands and rows are set together (or both 0 to derive them from threshold)")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ConfigError(f"dedup.near.bands x rows = {self.bands * self.rows} exceeds num_perm {self.num_perm}")
        if self.ngram < 1:
            raise ConfigError(f"dedup.near.ngram must be >= 1, got {self.ngram}")


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    exact: bool = True   # by a hash of the normalized text, lower-cased with whitespace collapsed
    near: NearDedupConfig = NearDedupConfig()


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Which Beam runner; `options` are passed through as Beam pipeline options (e.g. --project=... for Dataflow).

    workers / direct_running_mode apply to DirectRunner only (multi_processing uses `workers` processes).
    """

    name: str = "DirectRunner"
    workers: int = 1
    direct_running_mode: Literal["in_memory", "multi_threading", "multi_processing"] = "in_memory"
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in RUNNERS:
            near = difflib.get_close_matches(self.name, RUNNERS, n=1)
            raise ConfigError(f"runner.name {self.name!r} is not a Beam runner this command knows"
                              + (f"; did you mean {near[0]!r}?" if near else f" ({', '.join(RUNNERS)})"))
        if self.workers < 1:
            raise ConfigError(f"runner.workers must be >= 1, got {self.workers}")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """`internlm-jax data prepare`: sources -> normalize -> filters -> exact + near dedup -> tokenize -> shards.

    output_dir gets <source>/<source>-SSSSS-of-NNNNN.array_record, manifest.json, card.md and card.png.
    tokenizer: a tokenizer folder (tokenizer.model) or `byte`. Special-token strings in the text are encoded as
    plain text, never as control ids. num_shards: shards per source (documents go to a shard by a hash of
    their key, and are sorted by key inside it, so the bytes do not depend on the runner's scheduling).
    """

    sources: tuple[SourceSpec, ...]
    output_dir: str
    tokenizer: str = "byte"
    num_shards: int = 4
    bad_records: Literal["error", "skip"] = "error"
    overwrite: bool = False
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    runner: RunnerConfig = RunnerConfig()
    card: bool = True

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("sources must list at least one {name, path} entry")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"source names must be unique, repeated: {', '.join(dup)}")
        if not self.output_dir:
            raise ConfigError("output_dir is empty: name the folder that gets the shards and the manifest")
        if not self.tokenizer:
            raise ConfigError("tokenizer is empty: give a tokenizer folder or `byte`")
        if self.num_shards < 1:
            raise ConfigError(f"num_shards must be >= 1, got {self.num_shards}")

    def filters_for(self, source: SourceSpec) -> FilterConfig:
        """The global filter config with the source's overrides applied (validated)."""
        if not source.filter_overrides:
            return self.filters
        from internlm_jax.runconfig import from_dict, to_dict

        merged = {**to_dict(self.filters), **source.filter_overrides}
        return from_dict(FilterConfig, merged, where=f"sources[{source.name}].filter_overrides")


def load_prepare_config(path: str | None, overrides: Sequence[str] = ()) -> PrepareConfig:
    from internlm_jax.runconfig import load_config

    cfg = load_config(PrepareConfig, path, overrides)
    for s in cfg.sources:  # overrides are validated now, not in a worker halfway through a run
        cfg.filters_for(s)
    return cfg
