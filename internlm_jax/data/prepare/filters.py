"""Text normalization and quality filters (Gopher / C4 rules), each a pure function of one document.

`normalize_text(text, cfg) -> str`. A filter is `(name, fn)` with `fn(doc: DocView) -> bool` (True keeps);
`DocView` computes words, lines and n-gram hashes once per document and caches them, so the rules share that
work. `build_filters(cfg)` gives the enabled rules in order; `first_failure(text, filters)` names the first
rule that removes a document (None: kept): removal counts are per rule, in this order, and add up.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable

import numpy as np

from internlm_jax.data.prepare.config import FilterConfig, NormalizeConfig

# ------------------------------------------------------------------------------------------- normalize
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff]")
_TRAILING_WS_RE = re.compile(r"[ \t\u00a0\u3000]+$", re.MULTILINE)


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    text = _TRAILING_WS_RE.sub("", text)
    text = re.sub(f"\n{{{cfg.max_blank_lines + 2},}}", "\n" * (cfg.max_blank_lines + 1), text)
    return text.strip()


# ----------------------------------------------------------------------------------------------- words
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
WORD_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")              # Gopher words; one CJK character = one word
SHINGLE_WORD_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")       # words without punctuation (for MinHash)

_SCRIPT_RANGES = {
    "latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "kana": "\u3040-\u30ff",
    "hangul": "\uac00-\ud7af\u1100-\u11ff",
    "cyrillic": "\u0400-\u04ff",
    "greek": "\u0370-\u03ff",
    "arabic": "\u0600-\u06ff",
    "hebrew": "\u0590-\u05ff",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
}
_LETTER_RE = re.compile(r"[^\W\d_]")
_DIGIT_RE = re.compile(r"\d")
_SYMBOL_RE = re.compile(r"[^\w\s]|_")
_BULLETS = ("•", "●", "‣", "◦", "⁃", "·", "-", "*", "–", "—", "▪", "►")
_ELLIPSES = ("...", "…")
GOPHER_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))


class DocView:
    """One document's text and the pieces the rules read, each computed on first use."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        return WORD_RE.findall(self.text)

    @functools.cached_property
    def lines(self) -> list[str]:
        return [ln.strip() for ln in self.text.split("\n") if ln.strip()]

    @functools.cached_property
    def non_space_chars(self) -> int:
        return len("".join(self.text.split()))

    @functools.cached_property
    def letters(self) -> int:
        return sum(map(str.isalpha, self.text))

    @functools.cached_property
    def word_ids(self) -> np.ndarray:
        """Each word as a small int (equal words, equal ids), for vectorized n-gram work."""
        vocab: dict[str, int] = {}
        return np.fromiter((vocab.setdefault(w, len(vocab)) for w in self.words), dtype=np.uint64,
                           count=len(self.words))

    @functools.cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter((len(w) for w in self.words), dtype=np.int64, count=len(self.words))

    def ngram_hashes(self, n: int) -> np.ndarray:
        """A 64-bit polynomial hash of every word n-gram (len(words) - n + 1 of them)."""
        ids = self.word_ids
        m = len(ids) - n + 1
        if m <= 0:
            return np.zeros(0, np.uint64)
        h = np.zeros(m, np.uint64)
        mult = np.uint64(0x9E3779B97F4A7C15)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = h * mult + ids[k:k + m] + np.uint64(1)
        return h

    def ngram_char_fraction(self, n: int, which: str) -> float:
        """Fraction of word characters covered by n-grams that are `top` (the most frequent n-gram) or `dup`
        (every occurrence after the first of any n-gram); overlapping occurrences count a character once."""
        h = self.ngram_hashes(n)
        total = int(self.word_lengths.sum())
        if len(h) == 0 or total == 0:
            return 0.0
        _, first, inverse, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
        if which == "top":
            if counts.max() < 2:
                return 0.0
            starts = np.flatnonzero(inverse == int(np.argmax(counts)))
        else:
            starts = np.flatnonzero(first[inverse] != np.arange(len(h)))
        if len(starts) == 0:
            return 0.0
        covered = np.zeros(len(self.words) + 1, np.int64)
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + n, -1)
        mask = np.cumsum(covered)[:-1] > 0
        return float(self.word_lengths[mask].sum()) / total


Filter = tuple[str, Callable[[DocView], bool]]


# Each rule: keep (True) or remove (False). Thresholds come in through functools.partial.
def word_count(doc: DocView, lo: int | None, hi: int | None) -> bool:
    n = len(doc.words)
    return (lo is None or n >= lo) and (hi is None or n <= hi)


def mean_word_length(doc: DocView, lo: float | None, hi: float | None) -> bool:
    if not doc.words:
        return lo is None
    mean = float(doc.word_lengths.mean())
    return (lo is None or mean >= lo) and (hi is None or mean <= hi)


def symbol_word_ratio(doc: DocView, hi: float) -> bool:
    n = max(len(doc.words), 1)
    symbols = doc.text.count("#") + sum(doc.text.count(e) for e in _ELLIPSES)
    return symbols / n <= hi


def symbol_char_ratio(doc: DocView, hi: float) -> bool:
    return len(_SYMBOL_RE.findall(doc.text)) / max(doc.non_space_chars, 1) <= hi


def digit_ratio(doc: DocView, hi: float) -> bool:
    return len(_DIGIT_RE.findall(doc.text)) / max(doc.non_space_chars, 1) <= hi


def bullet_lines(doc: DocView, hi: float) -> bool:
    if not doc.lines:
        return True
    return sum(ln.startswith(_BULLETS) for ln in doc.lines) / len(doc.lines) <= hi


def ellipsis_lines(doc: DocView, hi: float) -> bool:
    if not doc.lines:
        return True
    return sum(ln.endswith(_ELLIPSES) for ln in doc.lines) / len(doc.lines) <= hi


def alpha_words(doc: DocView, lo: float) -> bool:
    if not doc.words:
        return lo <= 0
    return sum(1 for w in doc.words if w.isalpha() or _LETTER_RE.search(w)) / len(doc.words) >= lo


def stop_words(doc: DocView, lo: int) -> bool:
    found = 0
    for w in doc.words:
        if w.lower() in GOPHER_STOP_WORDS:
            found += 1
            if found >= lo:
                return True
    return found >= lo


def duplicate_lines(doc: DocView, hi: float) -> bool:
    lines = doc.lines
    if not lines:
        return True
    return (len(lines) - len(set(lines))) / len(lines) <= hi


def duplicate_line_chars(doc: DocView, hi: float) -> bool:
    seen: set[str] = set()
    dup = total = 0
    for ln in doc.lines:
        total += len(ln)
        if ln in seen:
            dup += len(ln)
        seen.add(ln)
    return total == 0 or dup / total <= hi


def top_ngram(doc: DocView, limits: dict[int, float]) -> bool:
    return all(doc.ngram_char_fraction(n, "top") <= hi for n, hi in sorted(limits.items()))


def duplicate_ngrams(doc: DocView, limits: dict[int, float]) -> bool:
    # Words covered by duplicated (n+1)-grams are covered by duplicated n-grams, so the fraction never grows
    # with n: when the smallest n is under every limit, the larger n need not be computed.
    items = sorted(limits.items())
    first = doc.ngram_char_fraction(items[0][0], "dup")
    if first <= min(hi for _, hi in items):
        return True
    return first <= items[0][1] and all(doc.ngram_char_fraction(n, "dup") <= hi for n, hi in items[1:])


def script(doc: DocView, pattern: re.Pattern[str], lo: float, latin: bool) -> bool:
    letters = doc.letters
    if letters == 0:
        return False  # nothing to read in any script
    if latin and doc.text.isascii():  # fast path: every letter is Latin
        return True
    return len(pattern.findall(doc.text)) / letters >= lo


def blocklist(doc: DocView, pattern: re.Pattern[str]) -> bool:
    return pattern.search(doc.text) is None


def blocklist_pattern(terms: list[str]) -> re.Pattern[str]:
    """Whole-word, case-insensitive alternation of the terms (a term inside a longer word does not match)."""
    alts = "|".join(sorted((re.escape(t.strip()) for t in terms if t.strip()), key=lambda s: (-len(s), s)))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


def read_blocklist(cfg: FilterConfig) -> list[str]:
    terms = list(cfg.blocklist)
    if cfg.blocklist_file:
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(cfg.blocklist_file) as f:
            for line in f.read().decode("utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    terms.append(line)
    return terms


def build_filters(cfg: FilterConfig, blocklist_terms: list[str] | None = None) -> list[Filter]:
    """The enabled rules, in the order they are applied."""
    P = functools.partial
    out: list[Filter] = []
    if cfg.min_words is not None or cfg.max_words is not None:
        out.append(("word_count", P(word_count, lo=cfg.min_words, hi=cfg.max_words)))
    if cfg.min_mean_word_length is not None or cfg.max_mean_word_length is not None:
        out.append(("mean_word_length", P(mean_word_length, lo=cfg.min_mean_word_length,
                                          hi=cfg.max_mean_word_length)))
    if cfg.scripts:
        cls = "".join(_SCRIPT_RANGES[s] for s in cfg.scripts)
        out.append(("script", P(script, pattern=re.compile(f"[{cls}]"), lo=cfg.min_script_ratio,
                                latin="latin" in cfg.scripts)))
    terms = read_blocklist(cfg) if blocklist_terms is None else blocklist_terms
    if terms:
        out.append(("blocklist", P(blocklist, pattern=blocklist_pattern(terms))))
    simple = [("symbol_word_ratio", symbol_word_ratio, cfg.max_symbol_word_ratio),
              ("symbol_char_ratio", symbol_char_ratio, cfg.max_symbol_char_ratio),
              ("digit_ratio", digit_ratio, cfg.max_digit_ratio),
              ("bullet_lines", bullet_lines, cfg.max_bullet_lines_ratio),
              ("ellipsis_lines", ellipsis_lines, cfg.max_ellipsis_lines_ratio)]
    out += [(name, P(fn, hi=v)) for name, fn, v in simple if v is not None]
    if cfg.min_alpha_words_ratio is not None:
        out.append(("alpha_words", P(alpha_words, lo=cfg.min_alpha_words_ratio)))
    if cfg.min_stop_words is not None:
        out.append(("stop_words", P(stop_words, lo=cfg.min_stop_words)))
    if cfg.max_duplicate_line_ratio is not None:
        out.append(("duplicate_lines", P(duplicate_lines, hi=cfg.max_duplicate_line_ratio)))
    if cfg.max_duplicate_line_char_ratio is not None:
        out.append(("duplicate_line_chars", P(duplicate_line_chars, hi=cfg.max_duplicate_line_char_ratio)))
    if cfg.max_top_ngram_char_ratio:
        out.append(("top_ngram", P(top_ngram, limits=cfg.max_top_ngram_char_ratio)))
    if cfg.max_duplicate_ngram_char_ratio:
        out.append(("duplicate_ngrams", P(duplicate_ngrams, limits=cfg.max_duplicate_ngram_char_ratio)))
    return out


ALL_FILTER_NAMES = ("word_count", "mean_word_length", "script", "blocklist", "symbol_word_ratio",
                    "symbol_char_ratio", "digit_ratio", "bullet_lines", "ellipsis_lines", "alpha_words",
                    "stop_words", "duplicate_lines", "duplicate_line_chars", "top_ngram", "duplicate_ngrams")


def first_failure(text: str, filters: list[Filter]) -> str | None:
    """The name of the first rule that removes `text`, or None if every rule keeps it."""
    doc = DocView(text)
    for name, fn in filters:
        if not fn(doc):
            return name
    return None
