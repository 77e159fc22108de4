"""The data card of a prepared corpus: card.md (tables) and card.png (tokens per source, token-length
histogram, what each stage removed), both made from manifest.json alone."""

from __future__ import annotations

import io
import os
from typing import Any


def _removals(src: dict[str, Any]) -> list[tuple[str, int]]:
    rows = [(f"filter: {f['name']}", f["removed"]) for f in src["filters"]]
    rows += [("bad records", src["bad_records"]), ("exact duplicates", src["exact_duplicates_removed"]),
             ("near duplicates", src["near_duplicates_removed"]), ("empty after tokenize", src["empty_after_tokenize"])]
    return rows


def card_markdown(manifest: dict[str, Any]) -> str:
    t = manifest["totals"]
    srcs = {n: manifest["sources"][n] for n in manifest["source_order"]}
    tok = manifest["tokenizer"]
    lines = ["# Data card", "",
             (f"Tokenizer `{tok['spec']}` (vocab {tok['vocab_size']}, sha256 `{tok['sha256'][:16]}`). "
              f"{t['docs_in']:,} documents in, {t['docs_out']:,} out ({t['docs_out'] / max(t['docs_in'], 1):.1%}), "
              f"{t['tokens']:,} tokens in {t['shards']} shards ({t['bytes'] / 2**20:.1f} MiB)."), "",
             "![data card](card.png)", "",
             "## Sources", "", "| source | weight | docs in | docs out | tokens | tokens/doc | shards |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in srcs.items():
        lines.append(f"| {name} | {s['weight']:g} | {s['docs_in']:,} | {s['docs_out']:,} | {s['tokens']:,} | "
                     f"{s['tokens'] / max(s['docs_out'], 1):,.0f} | {len(s['shards'])} |")
    lines += ["", "## What each stage removed", "", "| source | stage | in | removed | share of input |",
              "|---|---|---:|---:|---:|"]
    for name, s in srcs.items():
        for f in s["filters"]:
            lines.append(f"| {name} | filter: {f['name']} | {f['in']:,} | {f['removed']:,} | "
                         f"{f['removed'] / max(s['docs_in'], 1):.2%} |")
        for label, n in _removals(s)[len(s["filters"]):]:
            lines.append(f"| {name} | {label} | | {n:,} | {n / max(s['docs_in'], 1):.2%} |")
    d = manifest["dedup"]
    lines += ["", "## Duplicate clusters", "",
              (f"Exact: {d['exact']['clusters']:,} clusters, {d['exact']['removed']:,} documents removed. "
               f"Near (MinHash LSH, {d['near']['lsh']}): {d['near']['clusters']:,} clusters, "
               f"{d['near']['removed']:,} removed. Each cluster keeps its first document by key."), ""]
    return "\n".join(lines) + "\n"


def card_png(manifest: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srcs = {n: manifest["sources"][n] for n in manifest["source_order"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(srcs)
    axes[0].bar(names, [srcs[n]["tokens"] for n in names], color="tab:blue")
    axes[0].set_title("tokens per source")
    axes[0].set_ylabel("tokens")
    buckets = sorted({int(b) for s in srcs.values() for b in s["token_length_hist"]})
    bottom = [0] * len(buckets)
    for n in names:
        h = [srcs[n]["token_length_hist"].get(str(b), 0) for b in buckets]
        axes[1].bar([str(b) for b in buckets], h, bottom=bottom, label=n)
        bottom = [a + b for a, b in zip(bottom, h)]
    axes[1].set_title("document length (tokens, power-of-two buckets)")
    axes[1].set_ylabel("documents")
    axes[1].tick_params(axis="x", rotation=60)
    axes[1].legend(fontsize=8)
    labels = list(dict.fromkeys(lbl for s in srcs.values() for lbl, _ in _removals(s)))
    totals = [sum(dict(_removals(s)).get(lbl, 0) for s in srcs.values()) for lbl in labels]
    axes[2].barh(labels[::-1], totals[::-1], color="tab:red")
    axes[2].set_title("documents removed, by stage")
    axes[2].tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_card(manifest: dict[str, Any], output_dir: str) -> tuple[str, str]:
    from apache_beam.io.filesystems import FileSystems

    from internlm_jax.data.prepare.sink import is_local, join

    md, png = join(output_dir, "card.md"), join(output_dir, "card.png")
    if is_local(output_dir):
        os.makedirs(output_dir, exist_ok=True)
    for path, data in ((md, card_markdown(manifest).encode("utf-8")), (png, card_png(manifest))):
        with FileSystems.create(path) as f:
            f.write(data)
    return md, png
