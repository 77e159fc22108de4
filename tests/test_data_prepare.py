"""`internlm-jax data prepare` end to end on DirectRunner: planted duplicates removed (precision and recall on
known clusters), counts that add up, shards read back through the grain pipeline token for token, identical
bytes across runs and runner modes, the CLI and its errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from internlm_jax.config import ConfigError

pytest.importorskip("apache_beam", reason="the `data` extra (apache-beam) is not installed")
pytest.importorskip("datasketch", reason="the `data` extra (datasketch) is not installed")

from internlm_jax.data import DataConfig, build_pretrain_pipeline
from internlm_jax.data.prepare.config import load_prepare_config
from internlm_jax.data.prepare.filters import normalize_text
from internlm_jax.data.prepare.pipeline import run
from internlm_jax.data.prepare.synthetic import Generator, write_corpus
from internlm_jax.data.prepare.tokenize import encode_plain
from internlm_jax.tokenizer import Tokenizer
from tests.fixtures import make_tokenizer_dir


def _read_jsonl(paths: list[str]) -> dict[str, tuple[str, str]]:
    """{doc id: (stable key, text)}."""
    out = {}
    for p in paths:
        with open(p) as f:
            for line_no, line in enumerate(f, start=1):
                rec = json.loads(line)
                out[rec["id"]] = (f"web|{p}|{line_no:012d}", rec["text"])
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    web = write_corpus(str(root / "raw" / "web"), n_distinct=60, n_clusters=20, copies=2, near_frac=0.01, seed=0)
    docs = _read_jsonl(web["paths"])
    truth = dict(web["truth"])
    # A parquet source: distinct books, one cross-source exact copy of web doc d0, and a null row (bad record).
    gen = Generator(7)
    books = [gen.document(int(gen.rng.integers(150, 300))) for _ in range(15)] + [docs["d0"][1], None]
    book_path = str(root / "raw" / "books.parquet")
    pq.write_table(pa.table({"content": books}), book_path, row_group_size=6)
    for i, text in enumerate(books[:-1]):
        bid = f"b{i}"
        docs[bid] = (f"books|{book_path}|{i:012d}", text)
        truth[bid] = bid
    truth["b15"] = "d0"
    tok_dir = make_tokenizer_dir(root / "tok")
    overrides = [(f"sources=[{{name: web, path: '{root}/raw/web/*.jsonl'}}, "
                  f"{{name: books, path: '{book_path}', text_field: content, weight: 0.5}}]"),
                 f"tokenizer={tok_dir}", "filters.blocklist=[viagra]", "num_shards=3", "bad_records=skip",
                 "dedup.near.threshold=0.7"]
    cfg = load_prepare_config(None, [*overrides, f"output_dir={root}/out"])
    result = run(cfg)
    return {"root": root, "docs": docs, "truth": truth, "junk": web["junk"], "tok_dir": tok_dir,
            "overrides": overrides, "out": str(root / "out"), "manifest": result["manifest"]}


def _shard_records(out: str, manifest: dict, source: str) -> list[bytes]:
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    recs = []
    for sh in manifest["sources"][source]["shards"]:
        src = ArrayRecordDataSource([os.path.join(out, sh["path"])])
        recs += [src[i] for i in range(len(src))]
    return recs


def test_planted_duplicates_removed_distinct_kept(corpus):
    tok = Tokenizer.from_dir(corpus["tok_dir"], require_chat_tokens=False)
    by_tokens = {}
    for doc_id, (_, text) in corpus["docs"].items():
        ids = encode_plain(tok, normalize_text(text, load_prepare_config(None, [
            "sources=[{name: a, path: b}]", "output_dir=o"]).normalize))
        by_tokens[ids.tobytes()] = doc_id
    kept = [by_tokens[r] for s in ("web", "books") for r in _shard_records(corpus["out"], corpus["manifest"], s)]
    assert len(kept) == len(set(kept))
    kept = set(kept)
    assert not kept & set(corpus["junk"])
    truth = {k: v for k, v in corpus["truth"].items() if k in corpus["docs"]}
    clusters: dict[str, list[str]] = {}
    for doc_id, c in truth.items():
        clusters.setdefault(c, []).append(doc_id)
    removed = set(truth) - kept
    true_dups = sum(len(m) - 1 for m in clusters.values())
    wrongly_removed = [m for m in clusters.values() if not set(m) & kept]   # a whole cluster lost
    correct_removed = sum(len(set(m) - kept) for m in clusters.values() if set(m) & kept)
    precision = correct_removed / max(len(removed), 1) if not wrongly_removed else 0.0
    recall = correct_removed / true_dups
    assert true_dups == 41 and precision == 1.0 and recall >= 0.95, (precision, recall)
    # One exact copy per planted cluster, plus the cross-source copy of d0 (a cluster of 3). Each cluster
    # keeps its first member by stable key: the cross-source copy in books ("books|" <
    # "web|") survives, web's d0 goes.
    assert "b15" in kept and "d0" not in kept and "d0c0" not in kept
    m = corpus["manifest"]
    assert m["dedup"]["exact"]["clusters"] == 20 and m["dedup"]["exact"]["removed"] == 21
    assert m["dedup"]["exact"]["removed"] + m["dedup"]["near"]["removed"] == len(removed)


def test_manifest_counts_add_up(corpus):
    m = corpus["manifest"]
    web, books = m["sources"]["web"], m["sources"]["books"]
    assert web["docs_in"] == len([d for d in corpus["docs"] if not d.startswith("b")])
    assert books["docs_in"] == 16 and books["bad_records"] == 1
    removed_by = {f["name"]: f["removed"] for f in web["filters"]}
    for rule in corpus["junk"].values():
        assert removed_by[rule] == 1, rule
    assert sum(removed_by.values()) == len(corpus["junk"])
    assert all(f["removed"] == 0 for f in books["filters"])
    for s in (web, books):
        n = s["docs_in"]
        for f in s["filters"]:
            assert f["in"] == n and f["out"] == n - f["removed"]
            n = f["out"]
        assert n == s["after_filters"]
        assert n - s["exact_duplicates_removed"] - s["near_duplicates_removed"] - s["empty_after_tokenize"] \
            == s["docs_out"] == sum(sh["docs"] for sh in s["shards"])
        assert s["tokens"] == sum(sh["tokens"] for sh in s["shards"]) > 0
        assert sum(s["token_length_hist"].values()) == s["docs_out"]
        assert len(s["shards"]) == 3
    assert m["totals"]["docs_out"] == web["docs_out"] + books["docs_out"]
    card = (corpus["root"] / "out" / "card.md").read_text()
    assert "filter: duplicate_lines" in card and "| books | 0.5 |" in card
    assert (corpus["root"] / "out" / "card.png").read_bytes()[:4] == b"\x89PNG"


def _collect(it, n_batches=None):
    toks, tgts, batches = [], [], []
    for i, b in enumerate(it):
        if n_batches is not None and i == n_batches:
            break
        mask = b["loss_mask"] > 0
        toks.append(b["tokens"][mask])
        tgts.append(b["targets"][mask])
        batches.append(b)
    return np.concatenate(toks), np.concatenate(tgts), batches


def test_shards_read_back_through_grain_give_exactly_the_kept_tokens(corpus):
    tok = Tokenizer.from_dir(corpus["tok_dir"], require_chat_tokens=False)
    manifest_path = os.path.join(corpus["out"], "manifest.json")
    cfg = DataConfig.from_dict({"manifest": manifest_path, "seq_len": 32, "shuffle": False, "num_epochs": 1})
    assert cfg.tokenizer == corpus["tok_dir"] and [s.weight for s in cfg.sources] == [1.0, 0.5]
    web_only = cfg.replace(sources=cfg.sources[:1])
    with build_pretrain_pipeline(web_only, tok, global_batch_size=4, seed=0) as it:
        tokens, targets, _ = _collect(it)
    docs = [np.frombuffer(r, "<i4") for r in _shard_records(corpus["out"], corpus["manifest"], "web")]
    full = [np.concatenate([[tok.bos_id], d, [tok.eos_id]]) for d in docs]
    np.testing.assert_array_equal(tokens, np.concatenate([f[:-1] for f in full]))
    np.testing.assert_array_equal(targets, np.concatenate([f[1:] for f in full]))
    # And those records are the tokenizer's ids of the normalized texts kept (the check of the other test).
    assert sum(len(d) for d in docs) == corpus["manifest"]["sources"]["web"]["tokens"]


def test_mixture_from_manifest_resumes_exactly_and_checks_the_tokenizer(corpus):
    tok = Tokenizer.from_dir(corpus["tok_dir"], require_chat_tokens=False)
    manifest_path = os.path.join(corpus["out"], "manifest.json")
    cfg = DataConfig.from_dict({"manifest": manifest_path, "seq_len": 32, "shuffle_buffer": 8})
    with build_pretrain_pipeline(cfg, tok, global_batch_size=2, seed=3) as it:
        _collect(it, 3)
        state = it.get_state()
        _, _, want = _collect(it, 3)
    with build_pretrain_pipeline(cfg, tok, global_batch_size=2, seed=3) as it:
        it.set_state(json.loads(json.dumps(state)))
        _, _, got = _collect(it, 3)
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # The saved config (sources expanded) loads back; another tokenizer or a stale shard is refused.
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="not the tokenizer the shards"):
        DataConfig.from_dict({"manifest": manifest_path, "tokenizer": "byte"})
    stale = os.path.join(corpus["out"], "web", "web-00009-of-00009.array_record")
    open(stale, "wb").close()
    try:
        with pytest.raises(ConfigError, match="differ from the manifest"):
            DataConfig.from_dict({"manifest": manifest_path})
    finally:
        os.remove(stale)


def test_same_input_same_bytes_across_runs_and_runner_modes(corpus):
    out2 = str(corpus["root"] / "out2")
    cfg = load_prepare_config(None, [*corpus["overrides"], f"output_dir={out2}", "runner.workers=2",
                                     "runner.direct_running_mode=multi_threading"])
    run(cfg)
    names = sorted(os.path.relpath(os.path.join(d, f), corpus["out"])
                   for d, _, fs in os.walk(corpus["out"]) for f in fs)
    assert names == sorted(os.path.relpath(os.path.join(d, f), out2) for d, _, fs in os.walk(out2) for f in fs)
    assert "manifest.json" in names and len([n for n in names if n.endswith(".array_record")]) == 6
    for n in names:
        with open(os.path.join(corpus["out"], n), "rb") as a, open(os.path.join(out2, n), "rb") as b:
            assert a.read() == b.read(), n


def test_cli_prepare_and_errors(corpus, capsys):
    from internlm_jax.cli import main

    out = str(corpus["root"] / "cli_out")
    args = ["data", "prepare", "--config", "configs/data/tiny_prepare.yaml", *corpus["overrides"],
            f"output_dir={out}", "card=false"]
    assert main(args) == 0
    assert "prepared" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "manifest.json")) and not os.path.exists(os.path.join(out, "card.md"))
    assert main(args) == 2
    assert "already holds a prepared corpus" in capsys.readouterr().err
    assert main([*args, "dedup.near.treshold=0.5"]) == 2
    assert "did you mean 'dedup.near.threshold'" in capsys.readouterr().err
    missing = ["data", "prepare", "--config", "configs/data/tiny_prepare.yaml", "output_dir=" + out + "x",
               "sources=[{name: a, path: /nonexistent/dir/*.jsonl}]"]
    assert main(missing) == 2
    assert "matched no jsonl or parquet files" in capsys.readouterr().err


def test_bad_record_is_an_error_naming_file_and_line(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    cfg = load_prepare_config(None, [f"sources=[{{name: a, path: '{raw}'}}]", f"output_dir={tmp_path}/o",
                                     "dedup.near.enabled=false", "card=false"])
    with pytest.raises(Exception, match=r"raw.jsonl line 2: not valid JSON"):
        run(cfg)
