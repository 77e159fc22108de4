"""Text sources (jsonl, parquet, array_record) and their bad-input errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from internlm_jax.data import ByteTokenizer, DataConfig, DataError, SourceConfig, build_pretrain_pipeline
from internlm_jax.data.sources import open_source

TEXTS = ["alpha beta", "", "gamma δέλτα", "x" * 300, "last one"]


def write_jsonl(path, objs, blank_lines_after=()):
    with open(path, "w", encoding="utf-8") as f:
        for i, o in enumerate(objs):
            f.write((o if isinstance(o, str) else json.dumps(o)) + "\n")
            if i in blank_lines_after:
                f.write("\n  \n")


def write_array_record(path, records: list[bytes]):
    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()


def all_texts(cfg: SourceConfig) -> list[str]:
    src = open_source(cfg)
    return [src[i] for i in range(len(src))]


def test_jsonl_reads_texts_and_skips_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"text": t, "n": i} for i, t in enumerate(TEXTS)], blank_lines_after={1})
    src = open_source(SourceConfig(str(p)))
    assert [src[i] for i in range(len(src))] == TEXTS
    assert src.where(2) == f"{p} line 5"  # two blank lines after record 1 still count as file lines
    assert [pickle.loads(pickle.dumps(src))[i] for i in range(len(src))] == TEXTS  # worker processes


def test_jsonl_without_trailing_newline_and_custom_field(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"content": "one"}) + "\r\n" + json.dumps({"content": "two"}))
    assert all_texts(SourceConfig(str(p), text_field="content")) == ["one", "two"]


def test_parquet_across_row_groups(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), p, row_group_size=2)
    assert pq.ParquetFile(p).metadata.num_row_groups == 3
    src = open_source(SourceConfig(str(p)))
    assert [src[i] for i in (4, 0, 3, 1, 2)] == [TEXTS[i] for i in (4, 0, 3, 1, 2)]
    assert [pickle.loads(pickle.dumps(src))[i] for i in range(len(src))] == TEXTS


def test_array_record_json_and_raw_text(tmp_path):
    pj, pt = tmp_path / "j.array_record", tmp_path / "t.array_record"
    write_array_record(pj, [json.dumps({"text": t}).encode() for t in TEXTS])
    write_array_record(pt, [t.encode() for t in TEXTS[::-1]])
    assert all_texts(SourceConfig(str(pj))) == TEXTS
    assert all_texts(SourceConfig(str(pt))) == TEXTS[::-1]


def test_directory_and_glob_concatenate_files(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b0"}, {"text": "b1"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a0"}])
    (tmp_path / "notes.txt").write_text("not data")
    assert all_texts(SourceConfig(str(tmp_path))) == ["a0", "b0", "b1"]
    src = open_source(SourceConfig(str(tmp_path / "*.jsonl")))
    assert [src[i] for i in range(3)] == ["a0", "b0", "b1"] and src.where(2) == f"{tmp_path / 'b.jsonl'} line 2"


@pytest.mark.parametrize("fmt", ["parquet", "array_record"])
def test_pipeline_over_parquet_and_array_record(tmp_path, fmt):
    texts = [f"document number {i} " + "z" * (i * 7) for i in range(30)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": texts}), path, row_group_size=8)
    else:
        write_array_record(path, [json.dumps({"text": t}).encode() for t in texts])
    tok = ByteTokenizer()
    # Documents shuffled, rows not: the valid targets in row order are the documents back to back.
    cfg = DataConfig(sources=(SourceConfig(str(path)),), seq_len=48, num_epochs=1, shuffle_buffer=0)
    batches = list(build_pretrain_pipeline(cfg, tok, global_batch_size=2, seed=0))
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    targets = targets[targets >= 0]
    assert len(targets) == sum(len(t.encode()) + 1 for t in texts)  # text bytes + EOS
    inputs = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    assert (inputs == tok.bos_id).sum() == (targets == tok.eos_id).sum() == len(texts)
    docs, current = [], []
    for t in targets.tolist():
        if t == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    assert current == [] and sorted(docs) == sorted(texts) and docs != texts  # all back, in shuffled order


# ------------------------------------------------------------------------------------------ bad input

def test_nonexistent_path(tmp_path):
    with pytest.raises(DataError, match=r"data source path '.*missing.jsonl' does not exist"):
        open_source(SourceConfig(str(tmp_path / "missing.jsonl")))
    with pytest.raises(DataError, match="matched no files"):
        open_source(SourceConfig(str(tmp_path / "*.parquet")))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no data files"):
        open_source(SourceConfig(str(tmp_path)))
    with pytest.raises(DataError, match="cannot tell the format of .*readme.txt"):
        open_source(SourceConfig(str(tmp_path / "readme.txt")))


def test_empty_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e.jsonl is empty \(0 bytes\)"):
        open_source(SourceConfig(str(tmp_path / "e.jsonl")))
    (tmp_path / "b.jsonl").write_text("\n \n\r\n")
    with pytest.raises(DataError, match=r"b.jsonl has no records \(only blank lines\)"):
        open_source(SourceConfig(str(tmp_path / "b.jsonl")))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e.parquet is empty \(0 rows\)"):
        open_source(SourceConfig(str(tmp_path / "e.parquet")))
    write_array_record(tmp_path / "e.array_record", [])
    with pytest.raises(DataError, match=r"e.array_record is empty \(0 records\)"):
        open_source(SourceConfig(str(tmp_path / "e.array_record")))
    (tmp_path / "z.array_record").write_bytes(b"")
    with pytest.raises(DataError, match=r"z.array_record is empty \(0 bytes\)"):
        open_source(SourceConfig(str(tmp_path / "z.array_record")))


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    write_jsonl(p, [{"text": "fine"}, '{"text": "unterminated', ["a", "list"], {"text": 7}, b"\xff".decode("latin-1")],
                blank_lines_after={0})
    src = open_source(SourceConfig(str(p)))
    assert src[0] == "fine"
    with pytest.raises(DataError, match=r"bad.jsonl line 4: not valid JSON \(Unterminated string"):
        src[1]
    with pytest.raises(DataError, match=r"bad.jsonl line 5: expected a JSON object with a 'text' field, got a JSON "
                                        r"list"):
        src[2]
    with pytest.raises(DataError, match=r"bad.jsonl line 6: field 'text' is not a string \(got int\)"):
        src[3]
    with pytest.raises(DataError, match=r"bad.jsonl line 7: not valid JSON"):
        src[4]
    with open(p, "ab") as f:
        f.write(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 8: not UTF-8"):
        open_source(SourceConfig(str(p)))[5]


def test_missing_text_field_lists_available_keys(tmp_path):
    p = tmp_path / "k.jsonl"
    write_jsonl(p, [{"content": "a", "id": 1}])
    with pytest.raises(DataError, match=r"k.jsonl line 1: no field 'text' \(available keys: 'content', 'id'\); "
                                        "set text_field"):
        open_source(SourceConfig(str(p)))[0]
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "k.parquet")
    with pytest.raises(DataError, match=r"k.parquet: no column 'text' \(available columns: 'body', 'n'\)"):
        open_source(SourceConfig(str(tmp_path / "k.parquet")))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(DataError, match=r"i.parquet: column 'text' has type int64, expected a string column"):
        open_source(SourceConfig(str(tmp_path / "i.parquet")))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet row 1: column 'text' is null"):
        open_source(SourceConfig(str(tmp_path / "n.parquet")))[1]
    write_array_record(tmp_path / "k.array_record", [b'{"text": "a"}', b'{"body": "b"}', b"{oops", b"\xff\xfe"])
    src = open_source(SourceConfig(str(tmp_path / "k.array_record")))
    with pytest.raises(DataError, match=r"k.array_record record 1: no field 'text' \(available keys: 'body'\)"):
        src[1]
    with pytest.raises(DataError, match=r"k.array_record record 2: not valid JSON"):
        src[2]
    with pytest.raises(DataError, match=r"k.array_record record 3: not UTF-8"):
        src[3]


def test_unreadable_binary_files(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"x.parquet is not a readable parquet file"):
        open_source(SourceConfig(str(tmp_path / "x.parquet")))
    (tmp_path / "x.array_record").write_bytes(b"not an array record file")
    with pytest.raises(DataError, match=r"x.array_record is not a readable array_record file"):
        open_source(SourceConfig(str(tmp_path / "x.array_record")))
