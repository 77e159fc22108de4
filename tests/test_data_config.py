"""DataConfig / SourceConfig: YAML-shaped dicts in, validation errors that say what to change."""

from __future__ import annotations

import pytest
import yaml

from internlm_jax.config import ConfigError
from internlm_jax.data import DataConfig, SourceConfig


def test_from_dict_round_trip_and_shorthands():
    d = yaml.safe_load("""
sources:
  - {path: a.jsonl, weight: 3}
  - path: b.parquet
    format: parquet
    text_field: content
  - c.array_record
seq_len: 128
num_epochs: null
shuffle_buffer: 0
""")
    cfg = DataConfig.from_dict(d)
    assert cfg.sources == (SourceConfig("a.jsonl", weight=3), SourceConfig("b.parquet", "parquet", "content"),
                           SourceConfig("c.array_record"))
    assert (cfg.seq_len, cfg.num_epochs, cfg.shuffle_buffer, cfg.kind) == (128, None, 0, "pretrain")
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    assert DataConfig.from_dict({"sources": "one.jsonl"}).sources == (SourceConfig("one.jsonl"),)


@pytest.mark.parametrize("d, message", [
    ({"sources": ["a.jsonl"], "seq_length": 64}, r"unknown key 'seq_length' in data; did you mean 'seq_len'\?"),
    ({"sources": [{"path": "a.jsonl", "text_feild": "x"}]},
     r"unknown key 'text_feild' in data.sources\[\]; did you mean 'text_field'\?"),
    ({"sources": ["a.jsonl"], "zzz": 1}, r"unknown key 'zzz' in data. Valid keys: sources, tokenizer"),
    ({"seq_len": 64}, r"data.sources is required"),
    ({"sources": []}, r"at least one source"),
    ({"sources": [{"format": "jsonl"}]}, r"has no 'path'"),
    ({"sources": ["a.jsonl"], "seq_len": "512"}, r"data.seq_len must be int, got '512' \(str\)"),
    ({"sources": ["a.jsonl"], "seq_len": True}, r"data.seq_len must be int, got True"),
    ({"sources": ["a.jsonl"], "seq_len": 1}, r"seq_len must be >= 2"),
    ({"sources": ["a.jsonl"], "num_epochs": 0}, r"num_epochs must be >= 1 or null"),
    ({"sources": ["a.jsonl"], "worker_count": -1}, r"worker_count must be >= 0"),
    ({"sources": ["a.jsonl"], "kind": "rlhf"}, r"kind 'rlhf' is not one of pretrain, sft, dpo"),
    ({"sources": ["a.jsonl"], "bad_records": "ignore"}, r"bad_records 'ignore' is not one of error, skip"),
    ({"sources": [{"path": "a.jsonl", "weight": 0}]}, r"weight must be > 0"),
    ({"sources": [{"path": "a.jsonl", "format": "csv"}]}, r"format 'csv' is not one of jsonl, parquet"),
    ({"sources": [{"path": "a.jsonl", "text_field": ""}]}, r"text_field is empty"),
])
def test_bad_configs_say_what_is_wrong(d, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig.from_dict(d)
