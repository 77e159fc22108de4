"""Task metrics from cached prediction records (no model needed: a results file can always be recomputed).

Accuracy-like metrics are reported in percent (0..100) as OpenCompass does; perplexities and bits per byte
as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from internlm_jax.config import ConfigError
from internlm_jax.evaluate import code_exec, extract, metrics
from internlm_jax.evaluate.tasks import Task


def _pct(x: float) -> float:
    return 100.0 * x


def _gen_correct(task: Task, pred: str, gold: str) -> bool:
    if task.postprocess == "gsm8k":
        return extract.numbers_equal(pred, gold)
    if task.postprocess == "math":
        return pred == gold or extract.numbers_equal(pred, gold)
    return pred.strip() == str(gold).strip()


def score_task(task: Task, records: Sequence[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, per-sample details). Records must cover every item of the task."""
    records = sorted(records, key=lambda r: r["idx"])
    if [r["idx"] for r in records] != list(range(len(task))):
        raise ConfigError(f"task {task.name!r}: predictions cover {len(records)} of {len(task)} items")
    out: dict[str, float] = {}
    details: list[dict[str, Any]] = []
    if task.kind == "mc" and task.mode != "gen":
        golds = [r["gold"] for r in records]
        out["accuracy"] = _pct(metrics.accuracy([r["pred"] for r in records], golds))
        if task.mode == "ll":
            out["accuracy_norm"] = _pct(metrics.accuracy([r["pred_norm"] for r in records], golds))
    elif task.kind == "code":
        out, details = _score_code(task, records)
    elif task.kind in ("gen", "mc"):
        preds = [r["pred"] if isinstance(r["pred"], str) else r["pred"][0] for r in records]
        golds = [str(r["gold"]) for r in records]
        correct = [_gen_correct(task, p, g) for p, g in zip(preds, golds)]
        details = [{"idx": r["idx"], "pred": p, "gold": g, "correct": c}
                   for r, p, g, c in zip(records, preds, golds, correct)]
        for m in task.metrics:
            if m == "accuracy":
                out[m] = _pct(float(np.mean(correct)))
            elif m == "exact_match":
                out[m] = _pct(float(np.mean([metrics.exact_match(p, g) for p, g in zip(preds, golds)])))
            elif m == "f1":
                out[m] = _pct(float(np.mean([metrics.f1(p, g) for p, g in zip(preds, golds)])))
            elif m == "rouge_l":
                out[m] = _pct(float(np.mean([metrics.rouge_l(p, g) for p, g in zip(preds, golds)])))
            elif m == "bleu":
                out[m] = metrics.bleu(preds, golds)
            else:
                raise ConfigError(f"task {task.name!r}: unknown generation metric {m!r} (accuracy, exact_match, f1,"
                                  " rouge_l, bleu)")
    elif task.kind == "text":
        lp = sum(r["logprob"] for r in records)
        words = sum(r["num_words"] for r in records)
        nbytes = sum(r["num_bytes"] for r in records)
        ntok = sum(r["num_tokens"] for r in records)
        values = {"word_perplexity": math.exp(-lp / words), "byte_perplexity": math.exp(-lp / nbytes),
                  "bits_per_byte": -lp / nbytes / math.log(2), "token_perplexity": math.exp(-lp / ntok)}
        for m in task.metrics:
            if m not in values:
                raise ConfigError(f"task {task.name!r}: unknown perplexity metric {m!r} ({', '.join(values)})")
            out[m] = values[m]
    return out, details


def _score_code(task: Task, records: Sequence[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    programs, owner = [], []
    for r in records:
        s = task.samples[r["idx"]]
        comps = r["pred"] if isinstance(r["pred"], list) else [r["pred"]]
        for c in comps:
            programs.append(code_exec.humaneval_program(s["prompt"], c, s["test"], s["entry_point"]))
            owner.append(r["idx"])
    cfg = task.config
    outcomes = code_exec.run_programs(programs, backend=cfg.exec_backend, timeout=cfg.exec_timeout,
                                      memory_mb=cfg.exec_memory_mb)
    per: dict[int, list[code_exec.ExecOutcome]] = {}
    for i, o in zip(owner, outcomes):
        per.setdefault(i, []).append(o)
    out = {}
    for k in cfg.pass_k:
        vals = [metrics.pass_at_k(len(v), sum(o.passed for o in v), k) for v in per.values()]
        out[f"pass@{k}"] = _pct(float(np.mean(vals)))
    details = [{"idx": i, "task_id": task.samples[i]["task_id"], "passed": [o.passed for o in v],
                "status": [o.status for o in v], "detail": [o.detail for o in v]} for i, v in sorted(per.items())]
    return out, details
