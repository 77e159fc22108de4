"""Preference pairs for DPO: records -> (chosen, rejected) token sequences that share their prompt.

Accepted records (jsonl, one per line):
- {"prompt": str | messages, "chosen": str | message | messages, "rejected": ..., "tools"?: [...]}
  (XTuner / TRL style; a string prompt is one user turn, a string completion one assistant turn);
- {"chosen": messages, "rejected": messages}: two whole conversations; their longest common prefix of
  messages is the prompt (TRL's implicit prompt).
Both sides are rendered with the chat template; the loss mask covers only the completion's assistant turns
(turns of the prompt never count, even assistant ones), so the two sequences share their prompt tokens
exactly and differ only after it. A pair is packed as one unit (both sequences in the same row, each its own
segment), so the loss can compare them inside one micro-batch.

A pair longer than seq_len positions: truncation "error" stops, "turns" drops the pair (counted), "cut" cuts
each side to seq_len // 2 positions when that keeps at least one completion token on both sides.
"""

from __future__ import annotations

from typing import Any

from internlm_jax.data.sft import (
    DataReport,
    Seq,
    SFTDataConfig,
    Unit,
    render_segments,
    tokenize_segments,
)
from internlm_jax.data.sources import DataError


def _completion(value: Any, where: str, side: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {side!r} must be a string, a message or a list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: {side}[{i}] must be a message object with a 'role'")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: {side!r} has no assistant turn (roles: "
                        f"{', '.join(str(m['role']) for m in value)})")
    return list(value)


def split_prompt(obj: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen completion, rejected completion) of a DPO record."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            keys = ", ".join(map(repr, obj)) or "none"
            raise DataError(f"{where}: the DPO record lacks the field {key!r} (it has {keys})")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m for m in prompt):
            raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
        return list(prompt), _completion(obj["chosen"], where, "chosen"), _completion(obj["rejected"], where,
                                                                                     "rejected")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be whole conversations "
                        "(lists of messages) that share their first turns")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt turns; add a 'prompt' field")
    return list(chosen[:k]), _completion(chosen[k:], where, "chosen"), _completion(rejected[k:], where, "rejected")


def record_to_pair(obj: Any, fmt: str, where: str, tokenizer: Any, cfg: SFTDataConfig, report: DataReport
                   ) -> Unit | None:
    """One DPO record -> (chosen Seq with sign +1, rejected Seq with sign -1), or None when dropped."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got a JSON {type(obj).__name__}")
    if fmt not in ("auto", "dpo"):
        raise DataError(f"{where}: DPO data needs chosen/rejected records (source format auto or dpo), "
                        f"not {fmt!r}")
    prompt, chosen, rejected = split_prompt(obj, where)
    prompt = [{**m, "loss": False} for m in prompt]
    if cfg.system is not None and not (prompt and prompt[0].get("role") == "system"):
        prompt.insert(0, {"role": "system", "content": cfg.system, "loss": False})
    tools = obj.get("tools")
    seqs = []
    for sign, completion in ((1, chosen), (-1, rejected)):
        ids, loss = tokenize_segments(tokenizer, render_segments(prompt + completion, tools, where))
        seqs.append(Seq(ids, loss, sign=sign))
    total = sum(s.positions for s in seqs)
    if total <= cfg.seq_len:
        return tuple(seqs)
    if cfg.truncation == "error":
        raise DataError(f"{where}: the pair needs {total} positions, more than seq_len={cfg.seq_len}; raise "
                        "dataset.seq_len or set dataset.truncation to turns (drop) or cut")
    half = cfg.seq_len // 2
    if cfg.truncation == "cut" and all(s.loss[1: half + 1].any() for s in seqs):
        report.truncated += 1
        report.note("truncated", where, f"pair of {total} positions cut to {half} per side")
        return tuple(Seq(s.ids[: half + 1], s.loss[: half + 1], sign=s.sign) for s in seqs)
    report.dropped_too_long += 1
    report.note("dropped_too_long", where, f"dropped: the pair needs {total} positions, seq_len is {cfg.seq_len}")
    return None
