"""Constrained decoding: grammars for JSON output and forced tool calls, as per-row token masks.

The library is llguidance (Microsoft's, the engine under Guidance; also a vLLM/SGLang backend). It was
picked over xgrammar and outlines-core because it installs as one dependency-free abi3 wheel (xgrammar's
wheel requires torch, transformers and triton: a JAX server would have to ship PyTorch to mask logits),
it compiles grammars lazily (no slow schema compilation before the first token), its JSON-schema coverage
is the broadest of the three on JSONSchemaBench, and its Lark grammars name special tokens by id
(`<[92541]>`), which the InternLM2 tool-call format needs (`<|action_start|>` etc. are real special tokens).

    compiler = GrammarCompiler(tokenizer, vocab_size=config.vocab_size)   # once per tokenizer
    spec = GrammarSpec.json_schema({"type": "object", ...})             # hashable; in SamplingParams.grammar
    compiler.check(spec)                                                 # GrammarError (a 400) if invalid
    m = compiler.matcher(spec)                                           # one per sequence
    fill_bitmasks([(row, m), ...], bitmask)                              # int32 [B, ceil(V/32)], 1 = allowed
    m.accept(token)                                                      # after each sampled token

The mask is packed 32 tokens per int32 word (bit j of word w allows token 32w + j), handed to the jitted
step as one extra input and unpacked there (`sampling.unpack_bitmask`); rows without a grammar get all
ones. JSON is generated without free whitespace (separators ", " and ": ", as json.dumps writes them and as
InternLM2 saw tool calls in training), so a model cannot loop on whitespace. An object schema that lists
`properties` but says nothing of `additionalProperties` is generated with the listed properties only (as
xgrammar's strict mode and OpenAI's structured outputs do): the output still validates against the schema
as written, and a model cannot wander off into invented keys. Compiled grammars are cached per spec (a
matcher template is deep-copied per sequence).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import llguidance as llg
import numpy as np

from internlm_jax.config import ConfigError

KINDS = ("json_object", "json_schema", "tool_call")
# No free whitespace: `{"a": 1, "b": [2, 3]}` exactly as json.dumps writes it (no whitespace loops).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256  # compiled grammars kept (LRU, per compiler)


class GrammarError(ConfigError):
    """A schema or tool grammar that cannot be compiled; the message says why (a 400 in the server)."""


def _canonical(schema: Any, what: str) -> str:
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be a JSON object (a JSON schema), got {type(schema).__name__}")
    try:
        return json.dumps(schema, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"{what} is not serialisable as JSON: {e}") from None


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match (frozen and hashable: it is the compile-cache key).

    kind "json_object": any JSON object. "json_schema": an instance of `schema` (canonical JSON text).
    "tool_call": one InternLM2 plugin call `<|action_start|><|plugin|>\\n{"name": N, "parameters": P}
    <|action_end|>` where N is one of `tools` (name, parameters-schema JSON) and P matches that schema.
    strict: unsupported schema keywords are an error (else they are ignored, with a warning in the log).
    """

    kind: str
    schema: str = ""
    tools: tuple[tuple[str, str], ...] = ()
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "json_schema" and not self.schema:
            raise GrammarError("a json_schema grammar needs a schema")
        if self.kind == "tool_call" and not self.tools:
            raise GrammarError("a tool_call grammar needs at least one tool")

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any], strict: bool = True) -> GrammarSpec:
        return cls("json_schema", schema=_canonical(schema, "the schema"), strict=strict)

    @classmethod
    def tool_call(cls, tools: Sequence[tuple[str, dict[str, Any] | None]], strict: bool = False) -> GrammarSpec:
        """tools: (name, parameters schema or None = no parameters) per callable function."""
        out = []
        for name, params in tools:
            if not isinstance(name, str) or not name:
                raise GrammarError(f"tool names must be non-empty strings, got {name!r}")
            if params is None:  # a function without parameters takes an empty object
                params = {"type": "object", "properties": {}, "additionalProperties": False}
            out.append((name, _canonical(params, f"the parameters of tool {name!r}")))
        return cls("tool_call", tools=tuple(out), strict=strict)


# ---- the tokenizer, as llguidance sees it -----------------------------------------------------------
def _token_bytes(tokenizer: Any, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Bytes of every id (byte pieces `<0xNN>` are that byte, `▁` is a space) and the ids that are special.

    Special: the chat tokens, <unk>/<s>/</s>, control and unused pieces, and ids past the tokenizer's
    vocabulary (a model whose embedding is padded): grammars over text never allow them; a grammar names
    one by id (`<[id]>`).
    """
    sp = tokenizer.sp_model
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise ConfigError(f"the tokenizer has {n} pieces but the model's vocabulary is {vocab_size}")
    tokens: list[bytes] = []
    special: list[int] = []
    for i in range(vocab_size):
        if i >= n:
            tokens.append(f"<|pad_{i}|>".encode())
            special.append(i)
            continue
        piece = sp.id_to_piece(i)
        if tokenizer.is_special(i) or sp.is_control(i) or sp.is_unused(i) or sp.is_unknown(i):
            tokens.append(tokenizer.id_to_token(i).encode())
            special.append(i)
        elif sp.is_byte(i):
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
    return tokens, special


class _Wrapper:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads (ids, bytes, specials, encode)."""

    def __init__(self, tokenizer: Any, tokens: list[bytes], special: list[int]):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = tokens
        self.special_token_ids = special

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_bos=False, parse_special=False)


def build_ll_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> llg.LLTokenizer:
    """llguidance's tokenizer from ours: every id of the model's vocabulary; `stop_ids` end a grammar."""
    for attr in ("sp_model", "is_special", "id_to_token", "encode", "eos_id"):
        if not hasattr(tokenizer, attr):
            raise ConfigError("constrained decoding needs internlm_jax.tokenizer.Tokenizer (SentencePiece pieces "
                              f"and special-token table); got {type(tokenizer).__name__}")
    tokens, special = _token_bytes(tokenizer, vocab_size)
    # The JSON slices (token classes llguidance precomputes) cut mask time ~3x against the general ones here:
    # every grammar of ours is JSON, bare or inside the tool-call block.
    return llg.LLTokenizer(llg.TokenizerWrapper(_Wrapper(tokenizer, tokens, special)), n_vocab=vocab_size,
                           eos_token=[int(t) for t in stop_ids], slices=llg.LLTokenizer.json_slices())


# ---- grammars -----------------------------------------------------------------------------------------
_SUB_SCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_SUB_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SUB_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where objects listing `properties` (and no additional/pattern/unevaluated
    properties rule) allow no other keys. allOf branches are left alone (closing each would forbid the
    others' keys)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUB_SCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    for key in _SUB_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    for key in _SUB_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    if isinstance(out.get("properties"), dict) and not any(
            k in out for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")):
        out["additionalProperties"] = False
    return out


def _json_grammar(schema_text: str, strict: bool) -> str:
    options = dict(JSON_OPTIONS, lenient=not strict)
    return llg.LLMatcher.grammar_from_json_schema(json.dumps(close_objects(json.loads(schema_text))),
                                                  overrides=options)


def _lark_literal(text: str) -> str:
    """A Lark string literal matching `text` exactly (JSON string escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def tool_call_lark(tools: Sequence[tuple[str, str]], action_start: int, plugin: int, action_end: int,
                   strict: bool = False) -> str:
    """The InternLM2 plugin call as a Lark grammar; the action tokens are the special ids themselves."""
    rules = [f'start: <[{action_start}]> <[{plugin}]> "\\n" call <[{action_end}]>',
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, (name, params) in enumerate(tools):
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "parameters": '
        rules.append(f'call_{i}: {_lark_literal(head)} args_{i} "}}"')
        schema = close_objects(json.loads(params))
        schema["x-guidance"] = dict(JSON_OPTIONS, lenient=not strict)
        rules.append(f"args_{i}: %json " + json.dumps(schema, ensure_ascii=False))
    return "\n".join(rules) + "\n"


class GrammarMatcher:
    """One sequence's position in its grammar: give it each sampled token; it writes the next mask."""

    __slots__ = ("matcher", "spec")

    def __init__(self, matcher: llg.LLMatcher, spec: GrammarSpec):
        self.matcher = matcher
        self.spec = spec

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False (and an error state) if the grammar does not allow it."""
        return self.matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but a stop token may follow."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    def fill(self, out: np.ndarray) -> None:
        """The allowed-token bits of the next step into `out` (an int32 [ceil(V/32)] row, C-contiguous)."""
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)


class GrammarCompiler:
    """Compiles GrammarSpecs against one tokenizer (cached per spec) and hands out matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.mask_words = -(-vocab_size // 32)
        if stop_ids is None:
            stop_ids = [tokenizer.eos_id] + ([tokenizer.im_end_id] if "<|im_end|>" in tokenizer.special_tokens
                                              else [])
        self.ll_tokenizer = build_ll_tokenizer(tokenizer, vocab_size, stop_ids)
        self._cache: collections.OrderedDict[GrammarSpec, llg.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()

    def grammar(self, spec: GrammarSpec) -> str:
        """The llguidance grammar text of a spec."""
        if spec.kind == "json_object":
            return _json_grammar('{"type": "object"}', True)
        if spec.kind == "json_schema":
            return _json_grammar(spec.schema, spec.strict)
        tok = self.tokenizer
        try:
            ids = (tok.action_start_id, tok.plugin_id, tok.action_end_id)
        except (KeyError, ValueError) as e:  # a tokenizer without the chat tokens (TokenizerError)
            raise GrammarError(f"tool-call grammars need the InternLM2 chat tokens: {e}") from None
        return llg.LLMatcher.grammar_from_lark(tool_call_lark(spec.tools, *ids, strict=spec.strict))

    def _template(self, spec: GrammarSpec) -> llg.LLMatcher:
        with self._lock:
            m = self._cache.get(spec)
            if m is not None:
                self._cache.move_to_end(spec)
                return m
        try:
            text = self.grammar(spec)
        except ValueError as e:
            raise GrammarError(f"invalid schema: {e}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, self.ll_tokenizer)
        if is_error:
            raise GrammarError(f"the schema cannot be compiled to a grammar: {messages[0] if messages else '?'}")
        m = llg.LLMatcher(self.ll_tokenizer, text, log_level=0)
        if m.is_error():
            raise GrammarError(f"the schema cannot be compiled to a grammar: {m.get_error()}")
        with self._lock:
            self._cache[spec] = m
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return m

    def check(self, spec: GrammarSpec) -> list[str]:
        """Compile (or find cached) `spec`; GrammarError if it is invalid. Returns the grammar's warnings."""
        return list(self._template(spec).get_grammar_warnings())

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar (a copy of the cached compiled one)."""
        return GrammarMatcher(self._template(spec).deep_copy(), spec)


_EXECUTOR: llg.LLExecutor | None = None
# Threads for masks of several rows: a pool only pays off with spare cores (on a 2-core host the pool's
# hand-offs cost more than the masks). INTERNLM_JAX_MASK_THREADS overrides.
_PARALLEL_THREADS = int(os.environ.get("INTERNLM_JAX_MASK_THREADS", min(8, (os.cpu_count() or 1) // 2)))


def fill_bitmasks(rows: Sequence[tuple[int, GrammarMatcher]], bitmask: np.ndarray) -> None:
    """Fill `bitmask[row]` for each (row, matcher); several rows are computed in parallel (GIL released)."""
    global _EXECUTOR
    if bitmask.dtype != np.int32 or bitmask.ndim != 2 or not bitmask.flags["C_CONTIGUOUS"]:
        raise ValueError("the bitmask must be a C-contiguous int32 [B, words] array")
    if len(rows) == 1 or _PARALLEL_THREADS < 2:
        for i, m in rows:
            m.fill(bitmask[i])
        return
    if _EXECUTOR is None:
        _EXECUTOR = llg.LLExecutor(_PARALLEL_THREADS)
    B, words = bitmask.shape
    _EXECUTOR.unsafe_compute_mask_ptr([(m.matcher, i) for i, m in rows], bitmask.ctypes.data, words * 4, B)


def allowed_ids(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a packed mask row allows (tests, debugging)."""
    bits = np.unpackbits(np.ascontiguousarray(row).view(np.uint8), bitorder="little")[:vocab_size]
    return np.nonzero(bits)[0]


__all__ = ["JSON_OPTIONS", "GrammarCompiler", "GrammarError", "GrammarMatcher", "GrammarSpec", "allowed_ids",
           "build_ll_tokenizer", "close_objects", "fill_bitmasks", "tool_call_lark"]
