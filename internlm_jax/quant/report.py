"""The accuracy cost of quantization, as LMDeploy reports it: perplexity on held-out tokens and agreement of
greedy outputs, quantized model versus the original. Works on any two `internlm_jax.LM` objects (the weight-type
dispatch lets the same forward run dense, int4 or LoRA params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from internlm_jax.config import ConfigError


def _as_rows(tokens: Any) -> list[list[int]]:
    rows = [list(map(int, r)) for r in (tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)]
    if not rows or any(len(r) < 2 for r in rows):
        raise ConfigError("held-out token rows need at least 2 tokens each (and at least one row)")
    return rows


def token_nll(lm: Any, tokens: Any) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of each row given its prefix, and the token count."""
    rows = _as_rows(tokens)
    logits = lm.logits(rows)
    total, count = 0.0, 0
    for row, lg in zip(rows, logits):
        lg = np.asarray(lg, np.float64)[:-1]
        lse = np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1)) + lg.max(-1)
        total += float(np.sum(lse - lg[np.arange(len(row) - 1), row[1:]]))
        count += len(row) - 1
    return total, count


def perplexity(lm: Any, tokens: Any) -> float:
    """exp(mean next-token NLL) over held-out rows of token ids."""
    total, count = token_nll(lm, tokens)
    return float(np.exp(total / count))


def greedy_agreement(lm_ref: Any, lm_test: Any, prompts: Sequence[Sequence[int]], steps: int = 32) -> float:
    """Fraction of positions where the two models' free-running greedy continuations hold the same token.

    Both generate `steps` tokens per prompt (fewer if they stop); a position one model did not reach counts as
    a disagreement, so 1.0 means identical outputs.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ConfigError("greedy_agreement needs at least one prompt, each of at least one token")
    a = lm_ref.generate(prompts, steps, return_details=True)
    b = lm_test.generate(prompts, steps, return_details=True)
    same = total = 0
    for ga, gb in zip(a, b):
        n = max(len(ga.token_ids), len(gb.token_ids), 1)
        same += sum(x == y for x, y in zip(ga.token_ids, gb.token_ids))
        total += n
    return same / total


def top1_agreement(lm_ref: Any, lm_test: Any, tokens: Any) -> float:
    """Teacher-forced: fraction of positions of held-out rows where both models' argmax next token agree."""
    rows = _as_rows(tokens)
    la, lb = lm_ref.logits(rows), lm_test.logits(rows)
    same = sum(int(np.sum(np.argmax(x, -1) == np.argmax(y, -1))) for x, y in zip(la, lb))
    return same / sum(len(r) for r in rows)


def accuracy_report(lm_ref: Any, lm_test: Any, heldout: Any, prompts: Sequence[Sequence[int]] | None = None,
                    steps: int = 32) -> dict[str, float]:
    """{"ppl_ref", "ppl_test", "ppl_delta", "ppl_ratio", "top1_agreement", "greedy_agreement"}.

    heldout: rows of token ids for perplexity and teacher-forced agreement; prompts: token-id prompts for free
    greedy generation of `steps` tokens (default: the first half of each held-out row).
    """
    rows = _as_rows(heldout)
    ppl_ref, ppl_test = perplexity(lm_ref, rows), perplexity(lm_test, rows)
    if prompts is None:
        prompts = [r[: max(1, len(r) // 2)] for r in rows]
    return {"ppl_ref": ppl_ref, "ppl_test": ppl_test, "ppl_delta": ppl_test - ppl_ref,
            "ppl_ratio": ppl_test / ppl_ref, "top1_agreement": top1_agreement(lm_ref, lm_test, rows),
            "greedy_agreement": greedy_agreement(lm_ref, lm_test, prompts, steps)}


def format_report(rep: dict[str, float]) -> str:
    return (f"perplexity {rep['ppl_ref']:.4f} -> {rep['ppl_test']:.4f} (delta {rep['ppl_delta']:+.4f}, "
            f"x{rep['ppl_ratio']:.4f}); top-1 agreement {rep['top1_agreement']:.3f}; greedy agreement "
            f"{rep['greedy_agreement']:.3f}")
