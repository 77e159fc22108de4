"""Structured output through the real server (random-weight tiny model, openai SDK): response_format
json_object / json_schema and forced tool calls are constrained token by token, so every finished reply
parses and validates, in one generation, at the request's own temperature, streamed or not."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from fixtures import make_tokenizer_dir

from internlm_jax.serve.backend import ServeConfig
from internlm_jax.serve.testing import tiny_server

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
                "additionalProperties": False}},
    "required": ["name", "age", "address"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}}}
USER = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    with tiny_server(tok_dir, max_batch=8, max_len=512, num_pages=300,
                     config=ServeConfig(model_name="tiny", random_weights=True)) as (url, backend):
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), backend


def test_json_object_every_finished_choice_parses(client):
    c, backend = client
    r = c.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"},
                                  temperature=1.0, n=8, seed=3, max_tokens=200,
                                  extra_body={"return_token_ids": True})
    # Any object: a random model writes keys of random length, so some replies run into max_tokens; those
    # are reported as "length" (exactly max_tokens long), never as a finished reply.
    finished = [ch for ch in r.choices if ch.finish_reason == "stop"]
    assert len(finished) >= 2, [ch.finish_reason for ch in r.choices]
    for ch in r.choices:
        if ch.finish_reason == "stop":
            assert isinstance(json.loads(ch.message.content), dict)
        else:
            assert ch.finish_reason == "length" and len(ch.token_ids) == 200
    # usage counts this one generation (no hidden retries)
    assert r.usage.completion_tokens == sum(len(ch.token_ids) for ch in r.choices)
    assert backend.stats()["compilations"] == 0


def test_json_schema_greedy_is_deterministic_and_valid(client):
    c, _ = client
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    a, b = (c.chat.completions.create(model="tiny", messages=USER, response_format=rf, temperature=0,
                                      max_tokens=200) for _ in range(2))
    assert a.choices[0].finish_reason == "stop"
    assert a.choices[0].message.content == b.choices[0].message.content  # temperature 0 stays greedy
    jsonschema.validate(json.loads(a.choices[0].message.content), PERSON)
    sampled = c.chat.completions.create(model="tiny", messages=USER, response_format=rf, temperature=1.0, n=6,
                                        seed=1, max_tokens=200)
    for ch in sampled.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), PERSON)


def test_json_schema_streamed(client):
    c, _ = client
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chunks = list(c.chat.completions.create(model="tiny", messages=USER, response_format=rf, temperature=1.0,
                                            seed=5, max_tokens=200, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_call_on_random_weights(client, choice):
    c, _ = client
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What time is it?"}],
                                  tools=[WEATHER, CLOCK], tool_choice=choice, temperature=1.0, n=6, seed=2,
                                  max_tokens=120)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls", ch
        assert ch.message.content is None  # no injected text in the content
        (call,) = ch.message.tool_calls
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_streamed_forced_tool_call(client):
    c, _ = client
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], tool_choice="required", temperature=1.0, seed=9,
                                            max_tokens=120, stream=True))
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_bad_schemas_are_400_with_the_reason(client):
    c, _ = client

    def ask(schema, strict=None):
        js = {"name": "x", "schema": schema}
        if strict is not None:
            js["strict"] = strict
        return c.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0,
                                         response_format={"type": "json_schema", "json_schema": js})

    with pytest.raises(openai.BadRequestError, match="look-around"):  # a valid regex the grammar cannot do
        ask({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}})
    with pytest.raises(openai.BadRequestError, match="not a valid JSON schema"):
        ask({"type": "strin"})
    unsupported = {"type": "object", "if": {"type": "object"}, "then": {}}
    with pytest.raises(openai.BadRequestError, match="Unimplemented keys"):
        ask(unsupported, strict=True)
    assert ask(unsupported, strict=False).choices[0].finish_reason in ("stop", "length")  # ignored when not strict
    bad_tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": unsupported}}
    with pytest.raises(openai.BadRequestError, match="Unimplemented keys") as e:
        c.chat.completions.create(model="tiny", messages=USER, tools=[bad_tool], tool_choice="required",
                                  max_tokens=4)
    assert e.value.body["param"] == "tools"
