"""The summary table (OpenCompass summarizer style): rows dataset / version / metric / mode, one column per
model, `-` where a model has no number. Written as markdown, CSV and plain text, plus a grouped bar chart."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

HEADER = ("dataset", "version", "metric", "mode")


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) with numbers formatted to two decimals."""
    models = list(results["models"])
    rows: list[list[str]] = []
    for name, entry in results["tasks"].items():
        metric_names: list[str] = []
        for per_model in entry["metrics"].values():
            metric_names += [m for m in per_model if m not in metric_names]
        for metric in metric_names:
            row = [name, entry["version"], metric, entry["mode"]]
            for m in models:
                v = entry["metrics"].get(m, {}).get(metric)
                row.append("-" if v is None else f"{v:.2f}")
            rows.append(row)
        if not metric_names and entry.get("errors"):  # every model failed this task: one row says so
            rows.append([name, entry["version"], "-", entry["mode"]] +
                        ["error" if m in entry["errors"] else "-" for m in models])
        elif entry.get("errors"):
            for row in rows[len(rows) - len(metric_names):]:
                for j, m in enumerate(models):
                    if m in entry["errors"]:
                        row[4 + j] = "error"
    needle = {m: v for m, v in results.get("needle", {}).items() if v}
    if needle:
        version = next(iter(needle.values())).get("version", "-")
        rows.append(["needle_in_a_haystack", version, "score", "gen"] +
                    [f"{needle[m]['average']:.2f}" if m in needle else "-" for m in models])
    return list(HEADER) + models, rows


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def to_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] +
                     [fmt.format(*r) for r in rows]) + "\n"


def _is_lower_better(metric: str) -> bool:
    return metric.endswith("perplexity") or metric == "bits_per_byte"


def _number(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:  # "-" (no number) or "error"
        return float("nan")


def plot_bar_chart(header: Sequence[str], rows: Sequence[Sequence[str]], path: str) -> str:
    """Grouped bars: one group per (dataset, metric) row, one bar per model; missing values are left out.
    Scores (percent, higher is better) and perplexities (log scale, lower is better) get separate panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(header[4:])
    panels = [(title, [r for r in rows if _is_lower_better(r[2]) == low])
              for title, low in (("scores (higher is better)", False), ("perplexity (lower is better)", True))]
    panels = [(t, rs) for t, rs in panels if rs]
    n = max(len(models), 1)
    width = 0.8 / n
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6, 1.2 * max(len(rs) for _, rs in panels) + 2), 4.2 * len(panels)))
    for ax, (title, rs) in zip(axes[:, 0], panels):
        x = np.arange(len(rs))
        for j, m in enumerate(models):
            vals = [_number(r[4 + j]) for r in rs]
            bars = ax.bar(x + (j - (n - 1) / 2) * width, vals, width, label=m)
            # Every value is written on its bar, so a score of 0 (no visible bar) still shows as "0.00".
            ax.bar_label(bars, labels=["" if np.isnan(v) else r[4 + j] for v, r in zip(vals, rs)], fontsize=7,
                         padding=2)
        ax.set_xticks(x, [f"{r[0]}\n{r[2]}" for r in rs], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        if title.startswith("perplexity"):
            ax.set_yscale("log")
        else:  # scores are percentages: a fixed axis keeps 0 and 100 readable (and an all-zero panel drawn)
            ax.set_ylim(0, 110)
            ax.set_ylabel("score")
        if models:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_summary(results: dict[str, Any], work_dir: str, bar_chart: bool = True) -> dict[str, str]:
    header, rows = summary_rows(results)
    paths = {"markdown": os.path.join(work_dir, "summary.md"), "csv": os.path.join(work_dir, "summary.csv"),
             "text": os.path.join(work_dir, "summary.txt")}
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(to_markdown(header, rows))
    with open(paths["csv"], "w", encoding="utf-8") as f:
        f.write(to_csv(header, rows))
    with open(paths["text"], "w", encoding="utf-8") as f:
        f.write(to_text(header, rows))
    if bar_chart and any(_number(c) == _number(c) for r in rows for c in r[4:]):  # some number to draw
        paths["bar_chart"] = plot_bar_chart(header, rows, os.path.join(work_dir, "summary.png"))
    return paths
