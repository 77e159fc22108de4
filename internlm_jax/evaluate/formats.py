"""Built-in dataset formats: how a raw record of a known benchmark becomes a normalised sample, and the
default prompt, inferencer, post-processing and metrics of that benchmark.

Normalised samples by kind:
- "mc":   question, choices (list of texts), answer (gold index), subject
- "gen":  question, reference (the string compared after extraction), solution (worked answer for few-shot)
- "code": task_id, prompt, test, entry_point, canonical_solution
- "text": text
Templates are `str.format` strings over the sample's fields; multiple-choice samples also offer A, B, C, ...
(choice texts by letter), `label` / `choice` (the choice being scored) and `gold_label` / `gold_choice`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

from internlm_jax.config import ConfigError
from internlm_jax.evaluate import extract

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    kind: str  # mc | gen | code | text
    normalize: Callable[[dict[str, Any], dict[str, str], str], dict[str, Any]]  # (record, fields, path)
    inferencer: str
    prompt: str
    continuation: str = ""
    fewshot_answer: str = ""
    postprocess: str = "none"
    metrics: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    columns: tuple[str, ...] | None = None  # default column names for header-less CSV files


def _get(rec: dict[str, Any], names: tuple[str, ...], what: str, path: str) -> Any:
    lower = {str(k).lower(): k for k in rec}
    for n in names:
        if n in rec:
            return rec[n]
        if n.lower() in lower:
            return rec[lower[n.lower()]]
    raise ConfigError(f"{path}: a record lacks the {what} field (looked for {', '.join(names)}; it has "
                      f"{', '.join(map(str, rec))}); map it with `fields: {{{what}: COLUMN}}`")


def _field(fields: dict[str, str], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return (fields[key],) if key in fields else default


def _subject_from_path(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"_(test|dev|val|validation|train)$", "", stem)
    return stem.replace("_", " ")


def normalize_mc(rec: dict[str, Any], fields: dict[str, str], path: str) -> dict[str, Any]:
    """MMLU (header-less CSV or HF parquet), C-Eval (id,question,A..D,answer), CMMLU (Question,A..D,Answer),
    or any record with a question, options A.. (or a `choices` list) and an answer (letter or index)."""
    question = str(_get(rec, _field(fields, "question", ("question", "Question", "query", "input")), "question",
                        path))
    if "choices" in fields or any(k in rec for k in ("choices", "options", "endings")):
        choices = _get(rec, _field(fields, "choices", ("choices", "options", "endings")), "choices", path)
        if isinstance(choices, dict):  # HF {"label": [...], "text": [...]}
            choices = choices.get("text", [])
        choices = [str(c) for c in choices]
    else:
        choices = []
        lower = {str(k).lower(): k for k in rec}
        for letter in LETTERS:
            key = letter if letter in rec else lower.get(letter.lower())
            if key is None or rec[key] is None:
                break
            choices.append(str(rec[key]))
    if len(choices) < 2:
        raise ConfigError(f"{path}: a multiple-choice record needs at least two options (columns A, B, ... or a "
                          f"`choices` list); got {len(choices)}")
    raw = _get(rec, _field(fields, "answer", ("answer", "Answer", "label", "target")), "answer", path)
    answer = _answer_index(raw, len(choices), path)
    subject = rec.get(fields.get("subject", "subject")) or _subject_from_path(path)
    return {"question": question.strip(), "choices": choices, "answer": answer, "subject": str(subject)}


def _answer_index(raw: Any, n: int, path: str) -> int:
    if isinstance(raw, str) and raw.strip().upper() in LETTERS[:n] and raw.strip() != "":
        return LETTERS.index(raw.strip().upper())
    try:
        i = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: answer {raw!r} is neither a letter A..{LETTERS[n - 1]} nor an index") from None
    if not 0 <= i < n:
        raise ConfigError(f"{path}: answer index {i} is outside 0..{n - 1}")
    return i


def _hellaswag_clean(text: str) -> str:
    # lm-eval's HellaSwag preprocessing: WikiHow "[title]" markers become sentence breaks, other bracketed
    # tags are dropped, double spaces are squeezed.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def normalize_hellaswag(rec: dict[str, Any], fields: dict[str, str], path: str) -> dict[str, Any]:
    if "ctx_a" in rec:
        ctx = rec["ctx_a"] + " " + str(rec.get("ctx_b", "")).capitalize()
    else:
        ctx = str(_get(rec, ("ctx", "context"), "ctx", path))
    label = rec.get("activity_label", "")
    question = _hellaswag_clean(f"{label}: {ctx}" if label else ctx)
    endings = [_hellaswag_clean(str(e)) for e in _get(rec, ("endings",), "endings", path)]
    answer = _answer_index(_get(rec, ("label", "answer"), "label", path), len(endings), path)
    return {"question": question, "choices": endings, "answer": answer, "subject": str(label)}


def normalize_gsm8k(rec: dict[str, Any], fields: dict[str, str], path: str) -> dict[str, Any]:
    question = str(_get(rec, _field(fields, "question", ("question",)), "question", path))
    answer = str(_get(rec, _field(fields, "answer", ("answer",)), "answer", path))
    try:
        ref = extract.gsm8k_reference(answer)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    steps = re.sub(r"<<.*?>>", "", answer.split("#### ")[0]).strip()  # drop calculator annotations
    return {"question": question.strip(), "reference": ref, "solution": f"{steps}\nThe answer is {ref}."}


def normalize_math(rec: dict[str, Any], fields: dict[str, str], path: str) -> dict[str, Any]:
    problem = str(_get(rec, _field(fields, "question", ("problem", "question")), "problem", path))
    solution = str(rec.get("solution", ""))
    if "answer" in rec and rec["answer"] not in (None, ""):
        ref = extract.normalize_math(str(rec["answer"]))
    else:
        try:
            ref = extract.math_reference(solution)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    return {"question": problem.strip(), "reference": ref, "solution": solution.strip(),
            "level": str(rec.get("level", "")), "type": str(rec.get("type", ""))}


def normalize_gen(rec: dict[str, Any], fields: dict[str, str], path: str) -> dict[str, Any]:
    question = str(_get(rec, _field(fields, "question", ("question", "input", "prompt")), "question", path))
    ref = _get(rec, _field(fields, "reference", ("answer", "reference", "target", "output")), "reference", path)
    refs = [str(r) for r in ref] if isinstance(ref, list) else [str(ref)]
    return {"question": question, "reference": refs[0], "references": refs, "solution": refs[0]}


def normalize_humaneval(rec: dict[str, Any], fields: dict[str, str], path: str) -> dict[str, Any]:
    out = {}
    for key in ("task_id", "prompt", "test", "entry_point"):
        out[key] = str(_get(rec, (key,), key, path))
    out["canonical_solution"] = str(rec.get("canonical_solution", ""))
    return out


# Chars that WikiText's tokenisation split off with spaces; undone as lm-eval's wikitext_detokenizer does.
_WIKI_FIXES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
               (" ! ", "! "), (" ? ", "? "), (" , ", ", "), ("= = = =", "===="), ("= = =", "==="),
               ("= =", "=="), (" 's", "'s"), (" n't", "n't"), (" 'll", "'ll"), (" 're", "'re"), (" 've", "'ve"))


def wikitext_detokenize(text: str) -> str:
    for a, b in _WIKI_FIXES:
        text = text.replace(a, b)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', text)
    return text.replace(" \n", "\n").replace("\n ", "\n")


def normalize_text(rec: dict[str, Any], fields: dict[str, str], path: str) -> dict[str, Any]:
    return {"text": str(_get(rec, _field(fields, "text", ("page", "text", "content")), "text", path))}


_MMLU_PROMPT = ("The following is a multiple choice question about {subject}.\n\n{question}\n{options}\nAnswer:")
_CEVAL_PROMPT = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n{question}\n{options}\n答案："
_CMMLU_PROMPT = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n题目：{question}\n{options}\n答案是："
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")

FORMATS: dict[str, FormatSpec] = {
    "mmlu": FormatSpec("mc", normalize_mc, "ppl", _MMLU_PROMPT, " {label}", " {gold_label}", "first_option",
                       ("accuracy",), ("\n",), 8, ("question", "A", "B", "C", "D", "answer")),
    "ceval": FormatSpec("mc", normalize_mc, "ppl", _CEVAL_PROMPT, "{label}", "{gold_label}", "first_option",
                        ("accuracy",), ("\n",), 8),
    "cmmlu": FormatSpec("mc", normalize_mc, "ppl", _CMMLU_PROMPT, "{label}", "{gold_label}", "first_option",
                        ("accuracy",), ("\n",), 8),
    "mc": FormatSpec("mc", normalize_mc, "ppl", "{question}\n{options}\nAnswer:", " {label}", " {gold_label}",
                     "first_option", ("accuracy",), ("\n",), 8),
    "hellaswag": FormatSpec("mc", normalize_hellaswag, "ll", "{question}", " {choice}", " {gold_choice}",
                            "none", ("accuracy", "accuracy_norm")),
    "gsm8k": FormatSpec("gen", normalize_gsm8k, "gen", "Question: {question}\nLet's think step by step\nAnswer:",
                        "", " {solution}", "gsm8k", ("accuracy",), GSM8K_STOP, 512),
    "math": FormatSpec("gen", normalize_math, "gen", "Problem:\n{question}\nSolution:", "", "\n{solution}", "math",
                       ("accuracy",), ("Problem:", "</s>", "<|im_end|>"), 512),
    "gen": FormatSpec("gen", normalize_gen, "gen", "{question}", "", " {solution}", "strip", ("exact_match", "f1"),
                      ("\n\n",), 128),
    "humaneval": FormatSpec("code", normalize_humaneval, "gen", "{prompt}", "", "", "code", ("pass@1",),
                            extract.HUMANEVAL_STOP, 512),
    "wikitext": FormatSpec("text", normalize_text, "rolling", "", "", "", "none",
                           ("word_perplexity", "byte_perplexity", "bits_per_byte")),
    "text": FormatSpec("text", normalize_text, "rolling", "", "", "", "none",
                       ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")),
}


def get_format(name: str) -> FormatSpec:
    if name not in FORMATS:
        raise ConfigError(f"unknown task format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]
