"""Inferencers turn task items into per-item prediction records (JSON-able dicts, cached on disk).

- ppl:     score each filled-in choice; the lowest perplexity wins (OpenCompass PPL). The perplexity is that of
           the choice's own tokens given the prompt, exp(-mean log p), so shared prompt tokens cannot dilute it.
- ll:      summed log-likelihood of each choice (lm-eval `acc`) and the same divided by the choice's length in
           characters/bytes/tokens (lm-eval `acc_norm`).
- clp:     softmax over the first token of each choice at the answer position (OpenCompass CLP).
- gen:     generation with stop strings, then the task's post-processing.
- rolling: log-likelihood of whole texts in windows (perplexity of long text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from internlm_jax.config import ConfigError
from internlm_jax.evaluate.extract import get_postprocessor
from internlm_jax.evaluate.models import EvalModel
from internlm_jax.evaluate.tasks import Task


def _norm_len(text: str, unit: str, ntok: int) -> int:
    return {"char": len(text), "byte": len(text.encode("utf-8")), "token": ntok}[unit]


def infer_choices(task: Task, model: EvalModel, idxs: Sequence[int]) -> list[dict[str, Any]]:
    pairs = []
    for i in idxs:
        ctx = task.prompt(i)
        pairs += [(ctx, c) for c in task.continuations(i)]
    scores = model.loglikelihood(pairs)
    out, k = [], 0
    for i in idxs:
        conts = task.continuations(i)
        s = scores[k: k + len(conts)]
        k += len(conts)
        lp = [r.logprob for r in s]
        n = [r.num_tokens for r in s]
        rec: dict[str, Any] = {"idx": i, "gold": task.gold(i), "logprobs": lp, "num_tokens": n}
        if task.mode == "ppl":
            ppl = [math.exp(-a / b) for a, b in zip(lp, n)]
            rec.update(pred=int(np.argmin(ppl)), ppl=ppl)
        else:
            lens = [_norm_len(c, task.config.normalize, t) for c, t in zip(conts, n)]
            normed = [a / max(b, 1) for a, b in zip(lp, lens)]
            rec.update(pred=int(np.argmax(lp)), pred_norm=int(np.argmax(normed)),
                       is_greedy=[r.is_greedy for r in s])
        out.append(rec)
    return out


def infer_clp(task: Task, model: EvalModel, idxs: Sequence[int]) -> list[dict[str, Any]]:
    """Choice-token probabilities. The candidates are the first tokens at which the choices' continuations
    differ; tokens all choices share before that (e.g. a lone "▁" when " A" is two pieces) join the context,
    so the softmax is over the choices given everything they have in common."""
    contexts, cands = [], []
    for i in idxs:
        ctx = task.prompt(i)
        splits = [model.split(ctx, c) for c in task.continuations(i)]
        if any(s[0] != splits[0][0] for s in splits):
            raise ConfigError(f"task {task.name!r}: CLP needs every choice to start a new token after the prompt, "
                              "but a choice merges with the prompt's last token; use inferencer ppl or ll")
        conts = [s[1] for s in splits]
        p = 0
        while all(len(c) > p + 1 for c in conts) and len({c[p] for c in conts}) == 1:
            p += 1
        first = [c[p] for c in conts]
        if len(set(first)) != len(first):
            raise ConfigError(f"task {task.name!r}: CLP needs choices that differ in one token position (got "
                              f"token ids {first}); use inferencer ppl or ll")
        contexts.append(splits[0][0] + conts[0][:p])
        cands.append(first)
    lps = model.next_token_logprobs(contexts, cands)
    out = []
    for i, lp in zip(idxs, lps):
        lp = np.asarray(lp, np.float64)
        probs = np.exp(lp - lp.max())
        probs /= probs.sum()  # softmax over the choice tokens only
        out.append({"idx": i, "gold": task.gold(i), "pred": int(np.argmax(lp)), "probs": probs.tolist(),
                    "logprobs": lp.tolist()})
    return out


def infer_gen(task: Task, model: EvalModel, idxs: Sequence[int]) -> list[dict[str, Any]]:
    g = task.config.gen
    prompts = [task.prompt(i) for i in idxs]
    post = get_postprocessor(task.postprocess)
    samples: list[list[str]] = [[] for _ in idxs]
    for j in range(g.num_samples):
        texts = model.generate(prompts, max_new_tokens=task.max_new_tokens, stop=task.stop,
                               temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed + 1000 * j)
        for s, t in zip(samples, texts):
            s.append(t)
    out = []
    for i, raw in zip(idxs, samples):
        preds = [post(t) for t in raw]
        rec: dict[str, Any] = {"idx": i, "gold": task.gold(i)}
        if g.num_samples == 1:
            rec.update(raw=raw[0], pred=preds[0])
        else:
            rec.update(raw=raw, pred=preds)
        out.append(rec)
    return out


def infer_rolling(task: Task, model: EvalModel, idxs: Sequence[int]) -> list[dict[str, Any]]:
    texts = [task.samples[i]["text"] for i in idxs]
    res = model.loglikelihood_rolling(texts, task.config.window, task.config.stride)
    return [{"idx": i, "logprob": r.logprob, "num_tokens": r.num_tokens, "num_words": len(t.split()),
             "num_bytes": len(t.encode("utf-8"))} for i, t, r in zip(idxs, texts, res)]


INFERENCERS = {"ppl": infer_choices, "ll": infer_choices, "clp": infer_clp, "gen": infer_gen,
               "rolling": infer_rolling}


def run_inferencer(task: Task, model: EvalModel, idxs: Sequence[int]) -> list[dict[str, Any]]:
    return INFERENCERS[task.mode](task, model, idxs)
