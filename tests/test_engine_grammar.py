"""Constrained decoding in the engine: token masks inside the jitted sampler, driven by llguidance.

A random-weight tiny model at temperature 1 is close to a uniform draw over whatever the mask allows, the
hardest case for a grammar (a trained model mostly follows the format by itself): every finished reply
must parse and validate. Also: greedy stays the argmax within the mask, an all-allowed mask changes
nothing, forced tool calls give schema-valid arguments, and mixed constrained/free rows never compile.
"""

from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax import chat as chat_lib
from internlm_jax.engine.reference import _uncached_logits
from internlm_jax.grammar import GrammarError, GrammarSpec, allowed_ids, close_objects, fill_bitmasks
from internlm_jax.sampling import SamplingArrays, SamplingParams, sample, unpack_bitmask
from internlm_jax.serve.testing import tiny_engine

# ---- the sampler alone ----------------------------------------------------------------------------
_sample = jax.jit(sample)
V = 64


def _arrays(n: int, **kw) -> SamplingArrays:
    sp = SamplingParams(**{"temperature": 1.0, **kw})
    return SamplingArrays.build([(sp, 3, i) for i in range(n)], n)


def test_unpack_bitmask_matches_the_packed_bits():
    rng = np.random.default_rng(0)
    words = rng.integers(-2**31, 2**31, size=(3, 3), dtype=np.int64).astype(np.int32)
    got = np.asarray(unpack_bitmask(jnp.asarray(words), 70))
    for r in range(3):
        assert np.nonzero(got[r])[0].tolist() == allowed_ids(words[r], 70).tolist()


def test_mask_restricts_greedy_and_draws_with_filters():
    rng = np.random.default_rng(1)
    logits = np.tile(rng.normal(size=(1, V)).astype(np.float32) * 3, (256, 1))
    allowed = np.zeros((256, V), bool)
    allowed[:, [5, 9, 17, 40]] = True
    zeros = np.zeros((256, V), np.int32)
    greedy = np.asarray(_sample(logits, zeros, zeros.astype(bool), _arrays(256, temperature=0.0), allowed).tokens)
    best = [5, 9, 17, 40][int(np.argmax(logits[0, [5, 9, 17, 40]]))]
    assert set(greedy.tolist()) == {best}
    drawn = np.asarray(_sample(logits, zeros, zeros.astype(bool), _arrays(256), allowed).tokens)
    assert set(drawn.tolist()) <= {5, 9, 17, 40} and len(set(drawn.tolist())) > 1
    # top-k counts only allowed tokens (masked -inf logits must not drag the threshold to -inf)
    top2 = set(sorted([5, 9, 17, 40], key=lambda t: -logits[0, t])[:2])
    k2 = np.asarray(_sample(logits, zeros, zeros.astype(bool), _arrays(256, top_k=2), allowed).tokens)
    assert set(k2.tolist()) == top2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_all_allowed_mask_changes_nothing(temperature):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, V)).astype(np.float32)
    zeros = np.zeros((8, V), np.int32)
    a = _arrays(8, temperature=temperature, top_p=0.9)
    free = _sample(logits, zeros, zeros.astype(bool), a)
    ones = _sample(logits, zeros, zeros.astype(bool), a, np.ones((8, V), bool))
    assert np.array_equal(np.asarray(free.tokens), np.asarray(ones.tokens))


# ---- the engine -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)
    engine = tiny_engine(lm, max_batch=16, max_len=512, num_pages=560, chunk=32)
    yield lm, engine
    engine.shutdown()


def _prompt(tok, text: str) -> list[int]:
    return chat_lib.encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)


def _stops(tok) -> tuple[int, ...]:
    return tuple(tok.stop_token_ids())


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random schema (an object at the top) whose instances are short: bounded strings, arrays and
    integer ranges, enums, anyOf, nesting."""
    kinds = ["string", "integer", "boolean", "enum", "number", "null"]
    if depth < 2:
        kinds += ["object", "array", "object", "anyof"]
    kind = "object" if depth == 0 else rng.choice(kinds)
    if kind == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 6)}
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 5000)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        pool = ["red", "green", "blue", "a b", "ü", 1, 2, 3.5, None, True]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    if kind == "anyof":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    names = rng.sample(["id", "name", "tags", "x", "value", "ok", "meta", "城市"], rng.randint(1, 4))
    props = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    out = {"type": "object", "properties": props, "required": required}
    if rng.random() < 0.5:  # else closed by the grammar (grammar.close_objects); the schema still allows more
        out["additionalProperties"] = False
    return out


def test_fuzz_random_schemas_always_validate(env):
    lm, engine = env
    tok = lm.tokenizer
    rng = random.Random(16)
    schemas = [random_schema(rng) for _ in range(100)]
    prompt = _prompt(tok, "Reply with JSON.")
    params = [SamplingParams(temperature=1.0, max_tokens=256, seed=i, stop_token_ids=_stops(tok),
                             grammar=GrammarSpec.json_schema(s)) for i, s in enumerate(schemas)]
    before = engine.stats()["compilations"]
    outs = engine.generate([prompt] * len(schemas), params)
    assert engine.stats()["compilations"] == before == 0
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert reasons.count("stop") >= 98, reasons  # "length" (cut by max_tokens) is the one allowed exception
    for schema, out in zip(schemas, outs):
        o = out.outputs[0]
        if o.finish_reason == "length":
            continue
        assert o.finish_reason == "stop"
        assert not set(o.token_ids) & set(_stops(tok)), "a complete grammar stops before any stop token"
        jsonschema.validate(json.loads(o.text), schema)


WEATHER = ("get_weather", {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit"],
    "additionalProperties": False})
CLOCK = ("get_time", None)


def test_forced_tool_calls_have_schema_valid_arguments(env):
    lm, engine = env
    tok = lm.tokenizer
    tools = [WEATHER, CLOCK]
    schemas = {n: (p or {"type": "object", "properties": {}, "additionalProperties": False}) for n, p in tools}
    prompt = chat_lib.encode_chat(tok, [{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[{"name": n, "parameters": s} for n, s in schemas.items()],
                                  add_generation_prompt=True)
    sp = [SamplingParams(temperature=1.0, max_tokens=128, seed=s, stop_token_ids=tuple(tok.stop_token_ids(True)),
                         grammar=GrammarSpec.tool_call(tools)) for s in range(24)]
    sp.append(SamplingParams(temperature=0.0, max_tokens=128, stop_token_ids=tuple(tok.stop_token_ids(True)),
                             grammar=GrammarSpec.tool_call([WEATHER])))
    names = set()
    for sampling, out in zip(sp, engine.generate([prompt] * len(sp), sp)):
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        assert o.token_ids[0] == tok.action_start_id and o.token_ids[-1] == tok.action_end_id
        content, calls = chat_lib.parse_completion(o.text)
        assert content == "" and len(calls) == 1, o.text
        name = calls[0]["function"]["name"]
        assert name in {n for n, _ in sampling.grammar.tools}
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schemas[name])
        names.add(name)
    assert names == {"get_weather", "get_time"}


def test_greedy_is_the_argmax_within_the_mask(env):
    lm, engine = env
    tok = lm.tokenizer
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "b": {"type": "string", "maxLength": 5}},
              "required": ["a", "b"], "additionalProperties": False}
    spec = GrammarSpec.json_schema(schema)
    prompt = _prompt(tok, "JSON please")
    (out,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=64, grammar=spec,
                                                      stop_token_ids=_stops(tok)))
    ids = out.outputs[0].token_ids
    assert out.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.outputs[0].text), schema)
    # replay: at each step the engine's token is the argmax of the model's logits over the allowed tokens
    logits_fn = _uncached_logits(lm.config)
    m = engine.grammar_compiler.matcher(spec)
    seq = list(prompt)
    mask = np.zeros((1, engine.runner.mask_words), np.int32)
    width = len(prompt) + len(ids)  # one padded shape (causal: the padding after a prefix changes nothing)
    for t in ids:
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(logits_fn(lm.params, jnp.asarray(padded)))[0, len(seq) - 1]
        fill_bitmasks([(0, m)], mask)
        allowed = allowed_ids(mask[0], lm.config.vocab_size)
        assert t == allowed[np.argmax(logits[allowed])]
        assert m.accept(t)
        seq.append(t)
    assert m.done


def test_free_rows_beside_constrained_rows_are_unchanged(env):
    """A greedy free row gives the same tokens whether or not constrained rows share its steps, and the
    all-ones mask path equals an explicitly passed all-ones mask."""
    lm, engine = env
    tok = lm.tokenizer
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [_prompt(tok, f"tell me {i}") for i in range(4)]
    alone = [o.outputs[0].token_ids for o in engine.generate(prompts, free)]
    mixed_sp = [free] * 4 + [SamplingParams(temperature=1.0, max_tokens=12, seed=i, grammar=GrammarSpec.json_object(),
                                            stop_token_ids=_stops(tok)) for i in range(8)]
    mixed = engine.generate(prompts + [prompts[0]] * 8, mixed_sp)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    runner = engine.runner
    real = runner._mask
    runner._mask = lambda rows, B: np.full((B, runner.mask_words), -1, np.int32)  # explicit all-ones, sent over
    try:
        forced = [o.outputs[0].token_ids for o in engine.generate(prompts, free)]
    finally:
        runner._mask = real
    assert forced == alone
    assert engine.stats()["compilations"] == 0


def test_close_objects_only_closes_open_property_lists():
    s = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                          "b": {"type": "array", "items": {"properties": {"c": {}}}}},
         "allOf": [{"properties": {"d": {}}}], "$defs": {"x": {"properties": {}, "patternProperties": {"^z": {}}}}}
    c = close_objects(s)
    assert c["additionalProperties"] is False
    assert set(c["properties"]) == {"properties", "b"}  # a property named "properties" is not a schema keyword
    assert c["properties"]["properties"]["additionalProperties"] is False
    assert c["properties"]["b"]["items"]["additionalProperties"] is False
    assert c["allOf"] == s["allOf"] and c["$defs"] == s["$defs"]
    assert "additionalProperties" not in s  # the input is not modified


def test_invalid_schema_is_a_clear_error(env):
    _, engine = env
    with pytest.raises(GrammarError, match="Unimplemented keys"):
        engine.add_request([1, 2, 3], SamplingParams(grammar=GrammarSpec.json_schema(
            {"type": "object", "if": {"type": "object"}, "then": {}})))
    with pytest.raises(GrammarError, match="unclosed group"):
        engine.add_request([1, 2, 3], SamplingParams(grammar=GrammarSpec.json_schema(
            {"type": "string", "pattern": "(("})))
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0
