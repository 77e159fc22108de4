"""Local evaluation data: jsonl, json (a list), csv (with or without a header) and parquet files into a
list of records (dicts). Nothing is downloaded: a path that does not exist is an error that says so.

`assets:NAME` refers to the tiny sample files shipped in `internlm_jax/assets/eval/`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from internlm_jax.config import ConfigError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "eval")


def resolve_path(path: str, base_dir: str | None = None) -> str:
    if path.startswith("assets:"):
        return os.path.join(ASSETS, path[len("assets:"):])
    path = os.path.expanduser(os.path.expandvars(path))
    if base_dir and not os.path.isabs(path) and not os.path.exists(path):
        cand = os.path.join(base_dir, path)
        if os.path.exists(cand):
            return cand
    return path


def detect_format(path: str) -> str:
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".csv", "csv"), (".parquet", "parquet")):
        if path.endswith(ext):
            return fmt
    raise ConfigError(f"cannot tell the format of {path!r} from its name; set data.format to jsonl, json, csv "
                      "or parquet")


def load_records(path: str, fmt: str = "auto", columns: Sequence[str] | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a local file. `columns` names the columns of a header-less CSV (MMLU's files have none)."""
    if not os.path.exists(path):
        raise ConfigError(f"evaluation data {path!r} does not exist; evaluation never downloads data: point "
                          "data.path at your local copy (jsonl, json, csv or parquet)")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{n} is not valid JSON: {e}") from None
    elif fmt == "json":
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ConfigError(f"{path} must hold a JSON list of records")
    elif fmt == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        if columns:
            if rows and [c.strip().lower() for c in rows[0]] == [c.lower() for c in columns]:
                rows = rows[1:]  # the file has a header after all
            if any(len(r) != len(columns) for r in rows):
                bad = next(r for r in rows if len(r) != len(columns))
                raise ConfigError(f"{path}: a row has {len(bad)} fields but data.columns names {len(columns)}")
            records = [dict(zip(columns, r)) for r in rows]
        else:
            if not rows:
                return []
            header = rows[0]
            records = [dict(zip(header, r)) for r in rows[1:]]
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    else:
        raise ConfigError(f"unknown data format {fmt!r}; use jsonl, json, csv or parquet")
    if any(not isinstance(r, dict) for r in records):
        raise ConfigError(f"{path}: every record must be an object/row")
    return records[:limit] if limit is not None else records


def file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
