"""Corpus preparation, the pure parts: normalization, each quality rule on hand-made documents, dedup helpers,
config errors."""

from __future__ import annotations

import pytest

from internlm_jax.config import ConfigError
from internlm_jax.data.prepare import dedup, filters
from internlm_jax.data.prepare.config import (
    FilterConfig,
    NearDedupConfig,
    NormalizeConfig,
    load_prepare_config,
)
from internlm_jax.data.prepare.synthetic import Generator, junk_documents

GOOD = ("The quick brown fox jumps over the lazy dog near the river bank. "
        "Many people walk along the path with their children and dogs every morning. "
        "Later the sun rises above the hills and warms the valley with golden light. "
        "Farmers work in the fields while birds sing songs in the tall green trees. "
        "In the evening the town gathers in the square to share food and stories.")


def keeps(rule, text, **kw) -> bool:
    return rule(filters.DocView(text), **kw)


def test_normalize():
    cfg = NormalizeConfig()
    raw = "  Cafe\u0301 line one  \r\nline\u200b two\t\r\n\r\n\r\n\r\nthird\x00 line\r"
    assert filters.normalize_text(raw, cfg) == "Café line one\nline two\n\nthird line"
    assert filters.normalize_text("a\n\n\n\nb", NormalizeConfig(max_blank_lines=0)) == "a\nb"
    # NFC keeps full-width CJK punctuation, NFKC folds it.
    assert filters.normalize_text("你好，世界", cfg) == "你好，世界"
    assert filters.normalize_text("你好，世界", NormalizeConfig(unicode_form="NFKC")) == "你好,世界"


def test_words_count_each_cjk_character():
    assert filters.DocView("hello, world 你好世界").words == ["hello,", "world", "你", "好", "世", "界"]


def test_word_count_and_mean_length():
    assert keeps(filters.word_count, GOOD, lo=50, hi=100)
    assert not keeps(filters.word_count, "too short", lo=50, hi=None)
    assert not keeps(filters.word_count, GOOD, lo=None, hi=20)
    assert keeps(filters.mean_word_length, GOOD, lo=3, hi=10)
    assert not keeps(filters.mean_word_length, "a b c d e f g h", lo=3, hi=10)
    assert not keeps(filters.mean_word_length, "x" * 40 + " " + "y" * 30, lo=3, hi=10)


def test_symbol_and_digit_ratios():
    assert keeps(filters.symbol_word_ratio, GOOD, hi=0.1)
    assert not keeps(filters.symbol_word_ratio, GOOD + " #a #b #c #d #e #f #g" + " ..." * 3, hi=0.1)
    assert keeps(filters.symbol_char_ratio, GOOD, hi=0.25)
    assert not keeps(filters.symbol_char_ratio, "{}[]()<>;:" * 10 + " word", hi=0.25)
    assert keeps(filters.digit_ratio, GOOD + " in 1999", hi=0.2)
    assert not keeps(filters.digit_ratio, "call 555 0199 2231 8841 7720 now", hi=0.2)


def test_line_rules():
    bullets = "\n".join(f"• item number {w}" for w in "abcdefghij")
    assert not keeps(filters.bullet_lines, bullets, hi=0.9)
    assert keeps(filters.bullet_lines, bullets + "\n" + "\n".join(["plain line"] * 2), hi=0.9)
    ell = "\n".join(["and then it went on..."] * 2 + ["a full line."] * 2)
    assert not keeps(filters.ellipsis_lines, ell, hi=0.3)
    assert keeps(filters.ellipsis_lines, GOOD, hi=0.3)
    dup = "\n".join(["same line here"] * 4 + ["other line", "third line"])
    assert not keeps(filters.duplicate_lines, dup, hi=0.3)  # 3 of 6 lines repeat an earlier one
    assert keeps(filters.duplicate_lines, dup, hi=0.5)
    assert not keeps(filters.duplicate_line_chars, dup, hi=0.2)
    assert keeps(filters.duplicate_line_chars, GOOD.replace(". ", ".\n"), hi=0.2)


def test_alpha_and_stop_words():
    assert keeps(filters.alpha_words, GOOD, lo=0.8)
    assert not keeps(filters.alpha_words, "12 34 -- ++ 56 words here", lo=0.8)
    assert keeps(filters.stop_words, GOOD, lo=2)
    assert not keeps(filters.stop_words, "cats dogs birds fish run jump", lo=2)


def test_ngram_repetition():
    text = " ".join(["buy our product today"] * 20)
    assert not keeps(filters.top_ngram, text, limits={2: 0.2})
    assert not keeps(filters.duplicate_ngrams, text, limits={5: 0.15})
    assert keeps(filters.top_ngram, GOOD, limits={2: 0.2, 3: 0.18, 4: 0.16})
    assert keeps(filters.duplicate_ngrams, GOOD, limits={5: 0.15, 10: 0.1})
    # Characters of overlapping duplicate n-grams count once: "a b c a b c" has one repeated 3-gram
    # ("a b c") plus the overlapping ones; words 4..6 are covered, 3 of 6 words -> 0.5.
    assert filters.DocView("aa bb cc aa bb cc").ngram_char_fraction(3, "dup") == pytest.approx(0.5)
    assert filters.DocView("aa bb cc dd").ngram_char_fraction(2, "top") == 0.0


def test_script_filter():
    latin_han = filters.build_filters(FilterConfig(scripts=("latin", "han"), min_words=None, max_words=None))
    names = dict(latin_han)
    assert names["script"](filters.DocView("Hello 你好 world"))
    assert not names["script"](filters.DocView("Привет мир, как дела"))
    assert not names["script"](filters.DocView("12345 !!!"))  # no letters at all


def test_blocklist_is_whole_word_and_case_insensitive():
    pat = filters.blocklist_pattern(["viagra", "lorem ipsum"])
    assert not keeps(filters.blocklist, "Buy VIAGRA now", pattern=pat)
    assert not keeps(filters.blocklist, "Lorem  ipsum".replace("  ", " ") + " dolor", pattern=pat)
    assert keeps(filters.blocklist, "viagrafoo is another word", pattern=pat)


def test_first_failure_names_the_rule_for_each_planted_junk_document():
    rules = filters.build_filters(FilterConfig(), ["viagra"])
    assert filters.first_failure(filters.normalize_text(GOOD, NormalizeConfig()), rules) is None
    for rule, text in junk_documents(Generator(3)).items():
        assert filters.first_failure(filters.normalize_text(text, NormalizeConfig()), rules) == rule, rule


def test_disabled_rules_are_left_out():
    names = [n for n, _ in filters.build_filters(FilterConfig(min_words=None, max_words=None, scripts=(),
                                                              max_digit_ratio=None), [])]
    assert "word_count" not in names and "script" not in names and "digit_ratio" not in names
    assert "blocklist" not in names and names[0] == "mean_word_length"


def test_dedup_helpers():
    pytest.importorskip("datasketch", reason="the `data` extra (datasketch) is not installed")
    assert dedup.content_hash("Hello   World\n") == dedup.content_hash("hello world")
    assert dedup.content_hash("hello world") != dedup.content_hash("hello worlds")
    a = dedup.MinHasher(NearDedupConfig(threshold=0.7, seed=5))
    b = dedup.MinHasher(NearDedupConfig(threshold=0.7, seed=5))
    assert (a.bands, a.rows) == (14, 9)
    gen = Generator(1)
    text = gen.document(300)
    assert a.band_keys(text) == b.band_keys(text)  # the same seed gives the same buckets in any worker
    near = gen.near_copy(text, 0.01)
    assert dedup.jaccard(text, near, 5) > 0.85
    assert set(a.band_keys(text)) & set(a.band_keys(near))
    assert not set(a.band_keys(text)) & set(a.band_keys(gen.document(300)))
    assert a.band_keys("") == []
    assert dedup.clusters([("c", "a"), ("b", "c"), ("e", "d"), ("a", "b")]) == [["a", "b", "c"], ["d", "e"]]
    assert dedup.bucket_edges(["z", "x", "y", "x"]) == [("y", "x"), ("z", "x")]


def test_config_errors(tmp_path):
    base = ["sources=[{name: web, path: x.jsonl}]", "output_dir=out"]
    with pytest.raises(ConfigError, match="did you mean 'filters'"):
        load_prepare_config(None, [*base, "filter.min_words=3"])
    with pytest.raises(ConfigError, match=r"ratio in \[0, 1\]"):
        load_prepare_config(None, [*base, "filters.max_digit_ratio=2"])
    with pytest.raises(ConfigError, match="did you mean 'cyrillic'"):
        load_prepare_config(None, [*base, "filters.scripts=[cyrilic]"])
    with pytest.raises(ConfigError, match="unknown filter_overrides key 'min_word'.*'min_words'"):
        load_prepare_config(None, ["sources=[{name: web, path: x, filter_overrides: {min_word: 3}}]",
                                   "output_dir=out"])
    with pytest.raises(ConfigError, match="bands and rows are set together"):
        load_prepare_config(None, [*base, "dedup.near.bands=4"])
    with pytest.raises(ConfigError, match="source names must be unique"):
        load_prepare_config(None, ["sources=[{name: a, path: x}, {name: a, path: y}]", "output_dir=o"])
    with pytest.raises(ConfigError, match="did you mean 'DataflowRunner'"):
        load_prepare_config(None, [*base, "runner.name=DataFlowRunner"])
    cfg = load_prepare_config(None, ["sources=[{name: zh, path: x, filter_overrides: {min_mean_word_length: null}}]",
                                     "output_dir=o", "filters.max_top_ngram_char_ratio={2: 0.3}"])
    assert cfg.filters_for(cfg.sources[0]).min_mean_word_length is None
    assert cfg.filters.max_top_ngram_char_ratio == {2: 0.3}
