"""Server pieces without a server: the special-token text filter, SSE encoding, request parsing."""

from __future__ import annotations

import json
import random
import re

import pytest

from internlm_jax.serve.errors import APIError
from internlm_jax.serve.schemas import ChatCompletionRequest, completion_prompts, parse_request, stop_strings
from internlm_jax.serve.streaming import ChunkEncoder, TextFilter, sse

NAMES = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|plugin|>", "<s>", "</s>"]


def test_text_filter_any_split():
    rng = random.Random(0)
    pieces = ["hello ", "<|im_end|>", "a<b", "<", "|", "<|plu", "gin|>", "</s", ">", "x</", "<s>", " <|im_"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        want = re.sub("|".join(map(re.escape, sorted(NAMES, key=len, reverse=True))), "", text)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        f = TextFilter(NAMES)
        got = "".join(f.feed(p) for p in parts) + f.flush()
        assert got == want == TextFilter(NAMES).remove(text), (parts, got, want)


def test_sse_escapes_unicode_line_breaks():
    obj = {"text": "a\x85b\u2028c\u2029d\n\u4e2d"}
    for blob in (sse(obj), ChunkEncoder({"id": "x", "object": "o"}, True).choice(obj)):
        line = blob.decode()
        assert line.endswith("\n\n") and len(line[:-2].splitlines()) == 1  # one SSE line for any splitter
        parsed = json.loads(line[len("data: "):])
        assert parsed.get("text", parsed.get("choices", [{}])[0].get("text")) == obj["text"]
    enc = json.loads(ChunkEncoder({"id": "x", "created": 1}, True).choice({"index": 0})[6:])
    assert enc == {"id": "x", "created": 1, "choices": [{"index": 0}], "usage": None}


def test_prompt_and_stop_shapes():
    assert completion_prompts("hi") == ["hi"]
    assert completion_prompts([1, 2]) == [[1, 2]]
    assert completion_prompts([[1], [2, 3]]) == [[1], [2, 3]]
    assert completion_prompts(["a", "b"]) == ["a", "b"]
    for bad in (5, [], [True, 1], ["a", [1]], [[]], None):
        with pytest.raises(APIError) as e:
            completion_prompts(bad)
        assert e.value.status == 400 and e.value.param == "prompt"
    assert stop_strings("x") == ("x",) and stop_strings(None) == ()
    with pytest.raises(APIError, match="at most 16"):
        stop_strings(["s"] * 17)


def test_parse_request_messages():
    req = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "user": "u1",
                                                "metadata": {"k": 1}})
    assert req.messages[0].content == "hi" and req.model is None
    with pytest.raises(APIError, match=r"'messages\[1\].role'"):
        parse_request(ChatCompletionRequest, {"messages": [{"role": "user"}, {"role": "function", "content": "x"}]})
    with pytest.raises(APIError, match="'temperature': Input should be a valid number"):
        parse_request(ChatCompletionRequest, {"messages": [], "temperature": "1"})
