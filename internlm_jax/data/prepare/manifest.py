"""manifest.json of a prepared corpus: what went in, what each stage removed, what came out, and where.

Per source: documents in, then for each rule in order {in, removed, out}, exact and near duplicates removed,
documents and tokens out, a token-length histogram (power-of-two buckets) and the shard files (documents,
tokens, bytes, sha256). The counts add up (checked here: a mismatch is a bug, not a warning). The config
is stored without the fields that do not change the output (output_dir, runner, overwrite, card), so the
manifest is byte-identical across runs, runners and output folders.
"""

from __future__ import annotations

from typing import Any

from internlm_jax.data.prepare.config import PrepareConfig
from internlm_jax.data.prepare.filters import build_filters, read_blocklist

MANIFEST = "manifest.json"
FORMAT = "internlm-jax-prepared/1"
RECORD_DTYPE = "<i4"


def _config_dict(cfg: PrepareConfig) -> dict[str, Any]:
    from internlm_jax.runconfig import to_dict

    d = to_dict(cfg)
    for k in ("output_dir", "runner", "overwrite", "card"):
        d.pop(k)
    return d


def build_manifest(cfg: PrepareConfig, tokenizer_info: dict[str, Any], stats: dict[tuple, int],
                   shards: list[dict[str, Any]], examples: list[Any],
                   band_shape: tuple[int, int] | None) -> dict[str, Any]:
    def get(*key: Any) -> int:
        return int(stats.get(tuple(key), 0))

    sources: dict[str, Any] = {}
    for spec in cfg.sources:
        name = spec.name
        fcfg = cfg.filters_for(spec)
        n = get("docs_in", name)
        steps = []
        for rule, _ in build_filters(fcfg, read_blocklist(fcfg)):
            removed = get("filter", name, rule)
            steps.append({"name": rule, "in": n, "removed": removed, "out": n - removed})
            n -= removed
        src_shards = sorted((s for s in shards if s["source"] == name), key=lambda s: s["path"])
        hist = {str(k[2]): v for k, v in sorted(stats.items(), key=lambda kv: str(kv[0]))
                if k[0] == "length_hist" and k[1] == name}
        hist = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        entry = {
            "weight": spec.weight,
            "bad_records": get("bad_records", name),
            "docs_in": get("docs_in", name),
            "filters": steps,
            "after_filters": n,
            "exact_duplicates_removed": get("exact_removed", name),
            "near_duplicates_removed": get("near_removed", name),
            "empty_after_tokenize": get("empty_tokens", name),
            "docs_out": get("docs_out", name),
            "tokens": get("tokens", name),
            "chars": get("chars", name),
            "token_length_hist": hist,
            "shards": [{k: s[k] for k in ("path", "docs", "tokens", "bytes", "sha256")} for s in src_shards],
        }
        accounted = (n - entry["exact_duplicates_removed"] - entry["near_duplicates_removed"]
                     - entry["empty_after_tokenize"])
        if accounted != entry["docs_out"]:
            raise AssertionError(f"source {name}: counts do not add up: {entry}")
        if sum(s["docs"] for s in src_shards) != entry["docs_out"] or \
                sum(s["tokens"] for s in src_shards) != entry["tokens"]:
            raise AssertionError(f"source {name}: shard totals differ from the document counts")
        sources[name] = entry

    def sizes(kind: str) -> dict[str, int]:
        return {str(k[1]): v for k, v in sorted((k, v) for k, v in stats.items() if k[0] == kind)}

    return {
        "format": FORMAT,
        "record_dtype": RECORD_DTYPE,
        "tokenizer": tokenizer_info,
        "config": _config_dict(cfg),
        "sources": sources,
        "source_order": [spec.name for spec in cfg.sources],   # the mixture order (JSON objects are sorted)
        "dedup": {
            "exact": {"clusters": get("exact_clusters"), "removed": sum(s["exact_duplicates_removed"]
                                                                          for s in sources.values()),
                      "cluster_sizes": sizes("exact_cluster_size")},
            "near": {"clusters": get("near_clusters"), "removed": sum(s["near_duplicates_removed"]
                                                                        for s in sources.values()),
                     "cluster_sizes": sizes("near_cluster_size"),
                     "lsh": None if band_shape is None else {"bands": band_shape[0], "rows": band_shape[1]}},
            "examples": [{"kind": k, "kept": kept, "removed": list(removed)}
                         for k, kept, removed in sorted(examples)],
        },
        "totals": {
            "docs_in": sum(s["docs_in"] for s in sources.values()),
            "docs_out": sum(s["docs_out"] for s in sources.values()),
            "tokens": sum(s["tokens"] for s in sources.values()),
            "shards": sum(len(s["shards"]) for s in sources.values()),
            "bytes": sum(sh["bytes"] for s in sources.values() for sh in s["shards"]),
        },
    }
