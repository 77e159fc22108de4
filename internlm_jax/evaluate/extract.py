"""Answer extraction (post-processing) for generation tasks: GSM8K, MATH, multiple-choice letters, code.

Each post-processor maps raw model output to the string that is compared with the reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")
_THOUSANDS = re.compile(r"(\d),(?=\d{3}(?!\d))")


def strip_thousands(text: str) -> str:
    """"1,234,567" -> "1234567" (a comma between digit groups only; "1, 2" is left alone)."""
    return _THOUSANDS.sub(r"\1", text)


def gsm8k_prediction(text: str) -> str:
    """OpenCompass's GSM8K rule: cut at the next "Question:" (the model starting a new few-shot item), then the
    last number `-?\\d+\\.\\d+|-?\\d+`; thousands separators are removed first. "NULL" when there is none."""
    text = strip_thousands(text.split("Question:")[0])
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else "NULL"


def gsm8k_reference(answer: str) -> str:
    """The reference is what follows "#### " in the dataset's answer field, commas removed."""
    if "#### " not in answer:
        raise ValueError(f"GSM8K answer has no '#### ' marker: {answer[-80:]!r}")
    return answer.split("#### ")[-1].strip().replace(",", "")


def numbers_equal(pred: str, ref: str, tol: float = 1e-6) -> bool:
    if pred == ref:
        return True
    try:
        return abs(float(pred) - float(ref)) < tol
    except ValueError:
        return False


# ---- MATH ---------------------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with nested braces; None when there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        rest = text[start:].split("\\boxed ", 1)  # "\boxed 5" form
        return rest[1].split("$")[0].strip() if len(rest) == 2 else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


_ANSWER_IS = re.compile(r"(?:final answer|answer) is[:\s]*\$?(.+?)\$?(?:\.\s|\.$|$|\n)", re.IGNORECASE)


def math_prediction(text: str) -> str:
    """The last \\boxed{} answer; else "the answer is X"; else the last number; normalised."""
    text = text.split("Problem:")[0]
    ans = last_boxed(text)
    if ans is None:
        m = _ANSWER_IS.findall(text)
        ans = m[-1] if m else None
    if ans is None:
        numbers = _NUMBER.findall(strip_thousands(text))
        ans = numbers[-1] if numbers else ""
    return normalize_math(ans)


def math_reference(solution: str) -> str:
    ans = last_boxed(solution)
    if ans is None:
        raise ValueError(f"MATH solution has no \\boxed{{}} answer: {solution[-80:]!r}")
    return normalize_math(ans)


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        out += "\\frac"
        if p.startswith("{") or len(p) < 2:
            out += p
            continue
        a, rest = p[0], p[1:]
        if rest.startswith("{"):
            out += "{" + a + "}" + rest
        else:
            out += "{" + a + "}{" + rest[0] + "}" + rest[1:]
    return out


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_math(s: str) -> str:
    """A compact version of the usual MATH string normaliser (Hendrycks et al.): drop spacing commands,
    \\left/\\right, degrees, dollars, units in \\text{}, trailing ".", a leading "x =", spaces; unify
    \\dfrac/\\tfrac to \\frac; "0.5" -> "\\frac{1}{2}" style simple fractions a/b -> \\frac{a}{b}."""
    s = s.strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.rstrip(".")
    if len(s.split("=")) == 2 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(_fix_fracs(s.replace(" ", "")))
    if s.startswith("."):
        s = "0" + s
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if s == "0.5":
        s = "\\frac{1}{2}"
    return strip_thousands(s)


# ---- multiple choice ------------------------------------------------------------------------------------------
def first_option(text: str, options: str = "ABCD") -> str:
    """The chosen letter in free text: "answer is (B)", "答案是B", "B.", or the first standalone letter."""
    opts = re.escape(options)
    patterns = [
        rf"(?:answer|Answer|ANSWER)\s*(?:is|:)?\s*[:：]?\s*\(?([{opts}])\)?(?![A-Za-z])",
        rf"答案\s*(?:是|为|：|:)?\s*\(?([{opts}])",
        rf"^\s*\(?([{opts}])\)?(?:[.、:：)\s]|$)",
        rf"(?<![A-Za-z])([{opts}])(?![A-Za-z])",
    ]
    for pat in patterns:
        m = re.search(pat, text, flags=re.MULTILINE)
        if m:
            return m.group(1)
    return ""


# ---- code ---------------------------------------------------------------------------------------------------
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")


def code_completion(text: str) -> str:
    """A HumanEval completion: drop a leading ```python fence if the model opened one, cut at the stops."""
    if text.lstrip().startswith("```"):
        text = text.lstrip().split("\n", 1)[1] if "\n" in text.lstrip() else ""
    cut = min((text.find(s) for s in HUMANEVAL_STOP if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


POSTPROCESSORS: dict[str, Callable[[str], str]] = {
    "none": lambda s: s,
    "strip": str.strip,
    "gsm8k": gsm8k_prediction,
    "math": math_prediction,
    "first_option": first_option,
    "code": code_completion,
    "first_line": lambda s: s.strip().split("\n")[0].strip(),
}


def get_postprocessor(name: str) -> Callable[[str], str]:
    if name not in POSTPROCESSORS:
        raise ValueError(f"unknown postprocess {name!r}; choose one of {', '.join(POSTPROCESSORS)}")
    return POSTPROCESSORS[name]
