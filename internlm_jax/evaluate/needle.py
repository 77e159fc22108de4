"""Needle in a haystack (NeedleBench-style single-needle retrieval).

For each context length L (in tokens) and depth d (percent): the haystack is the local text, tokenised and
repeated until long enough, cut to L minus the needle's length; the needle's tokens are inserted at
`int(len(tokens) * d / 100)`; the decoded context goes into the prompt with the question; the model
generates greedily; a sample scores 100 when the answer contains the keyword (case-insensitive), else 0.
Outputs: a JSONL of every probe, a depth x length table (markdown + CSV) and a heatmap PNG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from internlm_jax.config import ConfigError

DEFAULT_DEPTHS = tuple(float(d) for d in range(0, 101, 10))


@dataclasses.dataclass(frozen=True)
class NeedleConfig:
    haystack: tuple[str, ...] = ("assets:needle/haystack.txt",)  # local text files (assets:NAME = shipped)
    lengths: tuple[int, ...] = (1000, 2000, 4000)  # context tokens (haystack + needle)
    depths: tuple[float, ...] = DEFAULT_DEPTHS  # percent of the context before the needle
    needle: str = "\nThe secret ingredient in Aunt Mei's dumplings is a spoonful of pear juice.\n"
    question: str = "What is the secret ingredient in Aunt Mei's dumplings?"
    keywords: tuple[str, ...] = ("pear",)  # all must appear in the answer
    prompt: str = ("{context}\n\nAnswer the question using only the text above.\nQuestion: {question}\n"
                   "Answer:")
    chat: bool = False
    max_new_tokens: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 16 for n in self.lengths):
            raise ConfigError(f"needle lengths must be >= 16 tokens, got {self.lengths}")
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise ConfigError(f"needle depths must lie in [0, 100], got {self.depths}")
        if not self.keywords:
            raise ConfigError("needle keywords is empty: give the word(s) a correct answer contains")
        if "{context}" not in self.prompt or "{question}" not in self.prompt:
            raise ConfigError("the needle prompt must contain {context} and {question}")


def build_context(hay_ids: list[int], needle_ids: list[int], length: int, depth: float) -> list[int]:
    """Haystack tokens (repeated as needed) cut to `length - len(needle)`, needle inserted at depth %."""
    if not hay_ids:
        raise ConfigError("the haystack text is empty")
    n = length - len(needle_ids)
    if n < 1:
        raise ConfigError(f"context length {length} is shorter than the needle ({len(needle_ids)} tokens)")
    tokens = (hay_ids * (n // len(hay_ids) + 1))[:n]
    at = int(len(tokens) * depth / 100)
    return tokens[:at] + needle_ids + tokens[at:]


def _read_haystack(paths: tuple[str, ...], base_dir: str | None) -> str:
    from internlm_jax.evaluate.data import resolve_path

    texts = []
    for p in paths:
        path = resolve_path(p, base_dir)
        if not os.path.exists(path):
            raise ConfigError(f"haystack file {path!r} does not exist (needle contexts are built from local text)")
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def run_needle(model: Any, config: NeedleConfig, out_dir: str, base_dir: str | None = None) -> dict[str, Any]:
    """Probe every (length, depth); write probes.jsonl, table.md, table.csv, heatmap.png into out_dir."""
    from internlm_jax.evaluate.tasks import fill

    tok = model.tokenizer
    if tok is None:
        raise ConfigError(f"model {model.name!r} has no tokenizer; the needle test builds contexts by tokens")
    hay_ids = model.encode(_read_haystack(config.haystack, base_dir))
    needle_ids = model.encode(config.needle)
    probes = []
    for length in config.lengths:
        for depth in config.depths:
            ctx = tok.decode(build_context(hay_ids, needle_ids, length, depth))
            text = fill(config.prompt, {"context": ctx, "question": config.question})
            prompt: Any = [{"role": "user", "content": text}] if config.chat else text
            probes.append({"length": length, "depth": depth, "prompt": prompt})
    longest = max(len(model.prompt_ids(p["prompt"])) for p in probes)
    if longest + config.max_new_tokens > model.max_length:
        raise ConfigError(f"the longest needle prompt is {longest} tokens; with max_new_tokens="
                          f"{config.max_new_tokens} it exceeds the model's max_length {model.max_length}; "
                          "lower needle.lengths")
    answers: list[str] = []
    for s in range(0, len(probes), config.batch_size):
        batch = [p["prompt"] for p in probes[s: s + config.batch_size]]
        answers += model.generate(batch, max_new_tokens=config.max_new_tokens, stop=("\n\n", "Question:"))
    os.makedirs(out_dir, exist_ok=True)
    scores: dict[int, dict[float, float]] = {}
    with open(os.path.join(out_dir, "probes.jsonl"), "w", encoding="utf-8") as f:
        for p, a in zip(probes, answers):
            hit = all(k.lower() in a.lower() for k in config.keywords)
            score = 100.0 if hit else 0.0
            scores.setdefault(p["length"], {})[p["depth"]] = score
            f.write(json.dumps({"length": p["length"], "depth": p["depth"], "answer": a, "score": score},
                               ensure_ascii=False) + "\n")
    table_md, table_csv = needle_table(scores, config)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table_md)
    with open(os.path.join(out_dir, "table.csv"), "w") as f:
        f.write(table_csv)
    heatmap = plot_heatmap(scores, config, os.path.join(out_dir, "heatmap.png"), title=model.name)
    values = [v for per in scores.values() for v in per.values()]
    version = hashlib.sha1(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:6]
    return {"version": version, "average": sum(values) / len(values),
            "scores": {str(k): {str(d): v for d, v in per.items()} for k, per in scores.items()},
            "heatmap": heatmap, "table": os.path.join(out_dir, "table.md")}


def needle_table(scores: dict[int, dict[float, float]], config: NeedleConfig) -> tuple[str, str]:
    """Rows = depth %, columns = context length, plus an average row; as markdown and CSV."""
    from internlm_jax.evaluate.summary import to_csv, to_markdown

    header = ["depth %"] + [str(n) for n in config.lengths]
    rows = [[f"{d:g}"] + [f"{scores[n][d]:.0f}" for n in config.lengths] for d in config.depths]
    rows.append(["average"] + [f"{sum(scores[n].values()) / len(scores[n]):.1f}" for n in config.lengths])
    return to_markdown(header, rows), to_csv(header, rows)


def plot_heatmap(scores: dict[int, dict[float, float]], config: NeedleConfig, path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[scores[n][d] for n in config.lengths] for d in config.depths])  # [depths, lengths]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(config.lengths), 1.0 + 0.4 * len(config.depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(config.lengths)), [str(n) for n in config.lengths])
    ax.set_yticks(range(len(config.depths)), [f"{d:g}" for d in config.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(f"needle in a haystack {title}".strip())
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
