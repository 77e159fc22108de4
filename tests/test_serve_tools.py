"""Tool calls and JSON mode through the server, with the official `openai` client.

(Constrained decoding on the model's own choices is tested in test_serve_structured.py; here the scripted
tokens go through the same grammar matchers, so a script must itself follow the grammar.)

A random tiny model never emits a tool call by itself, so the tokens it samples are FORCED by a script
(`serve.testing.script_engine` replaces the sampled token ids; the engine, stop tokens, detokenisation,
parsing, streaming and HTTP are all real). What is checked is everything around the model's choice: the
prompt the engine receives equals the InternLM2.md template (written out literally below), the reply's
tool_calls parse, a follow-up with the tool result renders as the environment turn, and streamed content
never carries special tokens."""

from __future__ import annotations

import json

import openai
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.serve.backend import ServeConfig
from internlm_jax.serve.testing import script_engine, serve_in_thread, tiny_engine

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "The city"}},
                   "required": ["location"]}}}
USER = {"role": "user", "content": "What is the weather in Shanghai?"}

# INTERNLM2.md's tool-call template, written out by hand (not produced by chat.render).
TOOLS_JSON = ('[{"name": "get_current_weather", "description": "Get the current weather in a given location", '
              '"parameters": {"type": "object", "properties": {"location": {"type": "string", "description": '
              '"The city"}}, "required": ["location"]}}]')
EXPECTED_FIRST = ("<s><|im_start|>system name=<|plugin|>\n" + TOOLS_JSON + "<|im_end|>\n"
                  "<|im_start|>user\nWhat is the weather in Shanghai?<|im_end|>\n"
                  "<|im_start|>assistant\n")
CALL_TEXT = ('I will look it up.<|action_start|><|plugin|>\n'
             '{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}<|action_end|>')
EXPECTED_SECOND = (EXPECTED_FIRST + CALL_TEXT + "<|im_end|>\n"
                   "<|im_start|>environment name=<|plugin|>\n{\"temperature\": 22}<|im_end|>\n"
                   "<|im_start|>assistant\n")
ANSWER_TEXT = "It is 22 degrees in Shanghai.<|im_end|>"
FORCED_CALL = ('<|action_start|><|plugin|>\n{"name": "get_current_weather", "parameters": {"location": "Beijing"}}'
               '<|action_end|>')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)
    tok = lm.tokenizer
    engine = tiny_engine(lm, max_batch=8, max_len=256)
    json_attempts: dict[str, list[str]] = {}  # prompt marker -> replies for successive attempts

    def script_for(prompt_ids, request_id):
        text = tok.decode(prompt_ids)
        if "environment name=<|plugin|>" in text:
            return tok.encode(ANSWER_TEXT, add_bos=False)
        if "Force a call." in text:  # tool_choice forced a call: the grammar allows only the call block
            return tok.encode(FORCED_CALL, add_bos=False)
        if "name=<|plugin|>" in text:
            return tok.encode(CALL_TEXT, add_bos=False)
        for marker, replies in json_attempts.items():
            if marker in text and replies:
                return tok.encode(replies.pop(0) + "<|im_end|>", add_bos=False)
        return None

    received = script_engine(engine, script_for)
    with serve_in_thread(engine, tok, ServeConfig(model_name="tiny")) as (url, backend):
        yield {"client": openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), "tok": tok,
               "received": received, "json_attempts": json_attempts, "backend": backend}
    engine.shutdown()


def test_tool_call_round_trip(env):
    client, tok, received = env["client"], env["tok"], env["received"]
    r1 = client.chat.completions.create(model="tiny", messages=[USER], tools=[WEATHER], temperature=0)
    assert tok.decode(received[-1]) == EXPECTED_FIRST
    assert received[-1] == tok.encode(EXPECTED_FIRST, add_bos=False)
    choice = r1.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look it up."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_current_weather"
    assert json.loads(call.function.arguments) == {"location": "Shanghai"}

    follow = [USER, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22}'}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], temperature=0)
    assert tok.decode(received[-1]) == EXPECTED_SECOND
    assert r2.choices[0].message.content == "It is 22 degrees in Shanghai."
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls


def test_streamed_tool_call_leaks_no_special_tokens(env):
    chunks = list(env["client"].chat.completions.create(model="tiny", messages=[USER], tools=[WEATHER],
                                                        temperature=0, stream=True))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(contents) == "I will look it up."
    for piece in contents:
        assert "<|" not in piece and "|>" not in piece and "action" not in piece
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id.startswith("call_")
    assert deltas[0].function.name == "get_current_weather"
    assert json.loads(deltas[0].function.arguments) == {"location": "Shanghai"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_choice(env):
    client, tok, received = env["client"], env["tok"], env["received"]
    named = {"type": "function", "function": {"name": "get_current_weather"}}
    force = {"role": "user", "content": "Force a call."}
    for choice in (named, "required"):
        r = client.chat.completions.create(model="tiny", messages=[force], tools=[WEATHER], tool_choice=choice,
                                           temperature=0)
        # nothing is injected: the prompt ends with the generation prompt, the grammar does the forcing
        assert tok.decode(received[-1]).endswith("Force a call.<|im_end|>\n<|im_start|>assistant\n")
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_current_weather"
        assert json.loads(call.function.arguments) == {"location": "Beijing"}
        assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"

    client.chat.completions.create(model="tiny", messages=[USER], tools=[WEATHER], tool_choice="none",
                                   max_tokens=2, temperature=0)
    assert "<|plugin|>" not in tok.decode(received[-1])
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="tiny", messages=[USER], tools=[WEATHER], max_tokens=2,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_json_object(env):
    client, attempts = env["client"], env["json_attempts"]
    msgs = lambda tag: [{"role": "user", "content": f"Reply in JSON. {tag}"}]

    # nothing is injected into the prompt; the reply ends where the object closes (the grammar is complete)
    attempts["first"] = ['{"city": "Shanghai", "temp": [22, null]} and some trailing words']
    r = client.chat.completions.create(model="tiny", messages=msgs("first"), response_format={"type": "json_object"},
                                       temperature=0)
    assert env["tok"].decode(env["received"][-1]).endswith("first<|im_end|>\n<|im_start|>assistant\n")
    assert r.choices[0].message.content == '{"city": "Shanghai", "temp": [22, null]}'
    assert r.choices[0].finish_reason == "stop"

    attempts["schema"] = ['{"name": "a"}']
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    r = client.chat.completions.create(model="tiny", messages=msgs("schema"), temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "n", "schema": schema}})
    assert json.loads(r.choices[0].message.content) == {"name": "a"}

    attempts["stream"] = ['{"s": 1}']
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs("stream"), temperature=0, stream=True,
                                                 response_format={"type": "json_object"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"s": 1}
    assert env["backend"].stats()["pages_used"] == 0
