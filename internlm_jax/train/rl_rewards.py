"""Prompts with references for online RL, and verifiable rewards (pure Python on the decoded response).

A prompt record is any chat record the SFT loader reads (OpenAI `messages`, XTuner `conversation`, ...): the
messages before its last assistant turn are the prompt, that turn is the reference (its content, or its tool
call). A verifiable reward maps (response text, reference) to a float:

    exact_match      1 if the stripped response equals the reference content
    math             1 if the last number of the response equals the last number of the reference
                     (GSM8K-style extraction: -?\\d+\\.\\d+|-?\\d+, commas removed)
    unit_conversion  1 if the response is "<number> <unit>" with the reference's number and unit
    tool_call        1 if the response's first tool call has the reference call's name and JSON arguments
    module:function  any importable callable (text, reference) -> float
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from internlm_jax.config import ConfigError

RewardFn = Callable[[str, "Reference"], float]


@dataclasses.dataclass(frozen=True)
class Reference:
    content: str
    tool_calls: tuple[dict, ...] = ()


@dataclasses.dataclass
class RLPrompt:
    messages: list[dict]
    tools: list | None
    reference: Reference
    ids: list[int] = dataclasses.field(default_factory=list)


def load_prompts(sources: Sequence[str], tokenizer: Any, *, max_prompt_len: int, limit: int = 0) -> list[RLPrompt]:
    """Read chat records, split off the last assistant turn as the reference, encode the prompt with the
    InternLM2 template (generation prompt appended). Prompts longer than max_prompt_len are an error."""
    from internlm_jax.chat import encode_chat
    from internlm_jax.data.sft import iter_records, record_to_messages, resolve_path

    out: list[RLPrompt] = []
    for src in sources:
        path = resolve_path(src)
        for where, obj, err in iter_records(path):
            if err is not None:
                raise err
            msgs, tools = record_to_messages(obj, "auto", where)
            idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            if not idx:
                raise ConfigError(f"{where}: an RL prompt record needs an assistant turn (the reference answer)")
            k = idx[0] if msgs[idx[0]].get("tool_calls") else idx[-1]  # a tool dialogue: its call is the answer
            ref = msgs[k]
            prompt = msgs[:k]
            ids = encode_chat(tokenizer, prompt, tools=tools)
            if len(ids) > max_prompt_len:
                raise ConfigError(f"{where}: the prompt has {len(ids)} tokens, above max_prompt_len={max_prompt_len}")
            out.append(RLPrompt(prompt, tools, Reference(str(ref.get("content") or ""),
                                                         tuple(ref.get("tool_calls") or ())), ids))
            if limit and len(out) >= limit:
                return out
    if not out:
        raise ConfigError(f"no prompts in {list(sources)}")
    return out


def _clean(text: str) -> str:
    for tok in ("<|im_end|>", "</s>"):
        text = text.split(tok)[0]
    return text.strip()


_NUM = re.compile(r"-?\d+\.\d+|-?\d+")


def last_number(text: str) -> str | None:
    found = _NUM.findall(text.replace(",", ""))
    return found[-1] if found else None


def exact_match(text: str, ref: Reference) -> float:
    return float(_clean(text) == ref.content.strip())


def math_answer(text: str, ref: Reference) -> float:
    want = last_number(ref.content)
    got = last_number(_clean(text))
    return float(want is not None and got is not None and float(got) == float(want))


_QTY = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*$")


def unit_conversion(text: str, ref: Reference) -> float:
    got, want = _QTY.match(_clean(text)), _QTY.match(ref.content)
    if got is None or want is None:
        return 0.0
    return float(float(got.group(1)) == float(want.group(1)) and got.group(2) == want.group(2))


def tool_call(text: str, ref: Reference) -> float:
    from internlm_jax.chat import parse_completion

    if not ref.tool_calls:
        return exact_match(text, ref)
    text = text.split("<|im_end|>")[0]
    if "<|action_start|>" in text and "<|action_end|>" not in text:
        text += "<|action_end|>"
    try:
        _, calls = parse_completion(text)
    except Exception:  # noqa: BLE001 - malformed model output earns no reward
        return 0.0
    if not calls:
        return 0.0
    want = ref.tool_calls[0]["function"]
    got = calls[0]["function"]
    try:
        args_ok = json.loads(got["arguments"]) == json.loads(want["arguments"])
    except (json.JSONDecodeError, TypeError):
        return 0.0
    return float(got["name"] == want["name"] and args_ok)


REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "math": math_answer,
                                "unit_conversion": unit_conversion, "tool_call": tool_call}


def resolve_reward(name: str) -> RewardFn:
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        mod, fn = name.split(":", 1)
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward.function {name!r} cannot be imported ({e})") from e
    raise ConfigError(f"reward.function {name!r} is unknown; use one of {sorted(REWARDS)} or module:function")
