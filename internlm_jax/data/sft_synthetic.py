"""Small synthetic instruction data written for this project: unit conversion, arithmetic, tool use, preference
pairs. A tiny model can learn the easy kinds (unit conversion is copy-the-number-and-append-zeros) in minutes on
a CPU, which is what the fine-tuning tests and tiny configs need; the files in internlm_jax/assets/sft are
this module's output (`python -m internlm_jax.data.sft_synthetic` rewrites them).

Train and held-out splits never share a number: a number n is held out when (n * 7919) % 10 == 3, so the
held-out prompts test generalisation, not recall.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

UNITS = (("km", "m", 1000), ("kg", "g", 1000), ("m", "cm", 100), ("L", "mL", 1000))
CITIES = ("Shanghai", "Beijing", "Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Sydney", "Toronto")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current temperature of a city in degrees Celsius.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SYSTEM = "You are a precise assistant. Answer with the result only."


def held_out(n: int) -> bool:
    return (n * 7919) % 10 == 3


def _numbers(rng: random.Random, split: str, lo: int, hi: int) -> int:
    while True:
        n = rng.randint(lo, hi)
        if held_out(n) == (split == "heldout"):
            return n


def unit_conversion(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """OpenAI `messages` records: "Convert 37 km to m." -> "37000 m"."""
    rng = random.Random(f"units-{seed}-{split}")
    out = []
    for _ in range(n):
        src, dst, factor = rng.choice(UNITS)
        k = _numbers(rng, split, 1, 999)
        msgs = [{"role": "user", "content": f"Convert {k} {src} to {dst}."},
                {"role": "assistant", "content": f"{k * factor} {dst}"}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        out.append({"messages": msgs})
    return out


def arithmetic(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """XTuner `conversation` records: "What is 12 + 7?" -> "12 + 7 = 19" (one or two turns)."""
    rng = random.Random(f"arith-{seed}-{split}")
    out = []
    for _ in range(n):
        turns = []
        for t in range(rng.choice((1, 1, 2))):
            a, b = _numbers(rng, split, 0, 99), rng.randint(0, 99)
            turn = {"input": f"What is {a} + {b}?", "output": f"{a} + {b} = {a + b}"}
            if t == 0:
                turn["system"] = SYSTEM
            turns.append(turn)
        out.append({"conversation": turns})
    return out


def alpaca(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    rng = random.Random(f"alpaca-{seed}-{split}")
    out = []
    for _ in range(n):
        k = _numbers(rng, split, 1, 999)
        out.append({"instruction": "Double the number.", "input": str(k), "output": str(2 * k)})
    return out


def tool_use(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Three-turn tool conversations: user asks, assistant calls get_weather, the tool answers, the assistant
    reports."""
    rng = random.Random(f"tools-{seed}-{split}")
    out = []
    for i in range(n):
        city = rng.choice(CITIES)
        temp = _numbers(rng, split, -20, 40)
        call_id = f"call_{seed}_{i}"
        out.append({"tools": [WEATHER_TOOL], "messages": [
            {"role": "user", "content": f"What is the temperature in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature": temp})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city}."}]})
    return out


def dpo_pairs(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """{"prompt", "chosen", "rejected"}: the correct conversion vs a wrong factor or a dropped digit."""
    rng = random.Random(f"dpo-{seed}-{split}")
    out = []
    for _ in range(n):
        src, dst, factor = rng.choice(UNITS)
        k = _numbers(rng, split, 1, 999)
        wrong = k * factor // 10 if rng.random() < 0.5 else k * factor * 10
        out.append({"prompt": [{"role": "user", "content": f"Convert {k} {src} to {dst}."}],
                    "chosen": [{"role": "assistant", "content": f"{k * factor} {dst}"}],
                    "rejected": [{"role": "assistant", "content": f"{wrong} {dst}"}]})
    return out


def write_jsonl(path: str, records: list[dict[str, Any]]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def write_assets(folder: str) -> list[str]:
    """The shipped files: train and held-out splits of each kind."""
    made = []
    for name, fn, n_train in (("unit_conversion", unit_conversion, 1200), ("arithmetic", arithmetic, 600),
                              ("tool_use", tool_use, 150), ("dpo_pairs", dpo_pairs, 400)):
        made.append(write_jsonl(os.path.join(folder, f"{name}.jsonl"), fn(n_train)))
        made.append(write_jsonl(os.path.join(folder, f"{name}_heldout.jsonl"), fn(max(n_train // 10, 30),
                                                                                   split="heldout")))
    path = os.path.join(folder, "alpaca_double.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(alpaca(200), f, indent=1)
    made.append(path)
    return made


if __name__ == "__main__":
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "sft")
    for p in write_assets(here):
        print(p)
