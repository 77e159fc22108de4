"""InternLM2 tokenizer: SentencePiece BPE plus the chat special tokens, and a streaming detokeniser.

The raw `tokenizer.model` knows the chat tokens only as `[UNUSED_TOKEN_141]`..`[UNUSED_TOKEN_146]`; their
names (`<|im_start|>` ...) and ids come from `added_tokens_decoder` in `tokenizer_config.json`. Encoding
therefore first splits text on the special-token strings and maps each to its id, then runs SentencePiece
on the plain stretches between them.

Decoding is done here, not by `SentencePieceProcessor.decode`, from a per-id table of surfaces (piece text
with `▁` -> space, one byte for `<0xAB>` pieces). The rules follow sentencepiece exactly (checked by the
tests against `sp.decode` on random ids): a maximal run of byte pieces is decoded as UTF-8 with one U+FFFD
per byte that does not start a valid character, control pieces are invisible, and a leading `▁` of the
first piece is dropped only for models trained with `add_dummy_prefix` or `remove_extra_whitespaces`
(InternLM2 keeps it). Sharing the table lets `IncrementalDetokenizer` run in O(1) per token with output
that concatenates to exactly `decode(ids)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import sentencepiece as spm

# Chat special tokens, in the order of their ids in the release (92538..92543).
PLUGIN = "<|plugin|>"
INTERPRETER = "<|interpreter|>"
ACTION_END = "<|action_end|>"
ACTION_START = "<|action_start|>"
IM_END = "<|im_end|>"
IM_START = "<|im_start|>"
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (PLUGIN, INTERPRETER, ACTION_END, ACTION_START, IM_END, IM_START)
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"

_REPLACEMENT = "\ufffd"
# Per-id kinds in the surface table.
_TEXT, _BYTE, _EMPTY, _SPECIAL = 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer folder, config or input that cannot be used; the message says what to do."""


def _token_content(value: Any) -> str | None:
    """HF configs store a token either as a string or as {"content": ..., "lstrip": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"cannot read a token from {value!r}; expected a string or {{'content': str, ...}}")


def _utf8_char_len(lead: int) -> int:
    """Bytes a UTF-8 character starting with `lead` needs; 1 for bytes that cannot start a multi-byte one."""
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 1


def _decode_utf8_char(data: bytes | bytearray, start: int, end: int) -> tuple[str, int]:
    """Decode one character at data[start:end] the way sentencepiece does: (text, bytes consumed).

    A valid, shortest-form, non-surrogate character of n bytes gives (char, n); anything else gives
    (U+FFFD, 1), so a truncated or malformed sequence becomes one U+FFFD per byte.
    """
    lead = data[start]
    if lead < 0x80:
        return chr(lead), 1
    n = _utf8_char_len(lead)
    if n == 1 or end - start < n:
        return _REPLACEMENT, 1
    cp = lead & (0x7F >> n)
    for i in range(start + 1, start + n):
        if data[i] & 0xC0 != 0x80:
            return _REPLACEMENT, 1
        cp = (cp << 6) | (data[i] & 0x3F)
    minimum = (0, 0, 0x80, 0x800, 0x10000)[n]
    if cp < minimum or 0xD800 <= cp < 0xE000 or cp > 0x10FFFF:
        return _REPLACEMENT, 1
    return chr(cp), n


def _decode_byte_run(data: bytes | bytearray, final: bool) -> tuple[str, int]:
    """Decode a run of byte pieces; returns (text, bytes consumed).

    With final=False an incomplete character at the end is left unconsumed (more bytes may complete it);
    with final=True the run has ended and every remaining byte is decided.
    """
    out: list[str] = []
    pos, end = 0, len(data)
    while pos < end:
        if not final and end - pos < _utf8_char_len(data[pos]):
            break
        text, used = _decode_utf8_char(data, pos, end)
        out.append(text)
        pos += used
    return "".join(out), pos


class Tokenizer:
    """SentencePiece model + special-token table (name -> id).

    `Tokenizer.from_dir(path)` reads an HF-style folder (tokenizer.model + tokenizer_config.json);
    `Tokenizer(model_file, special_tokens)` takes the table directly; <unk>/<s>/</s> are added from the
    model's control pieces when the table lacks them.
    """

    def __init__(self, model_file: str | os.PathLike, special_tokens: dict[str, int] | None = None, *,
                 bos_token: str = BOS, eos_token: str = EOS, pad_token: str | None = None,
                 unk_token: str = UNK, add_bos_token: bool = True, add_eos_token: bool = False,
                 config: dict[str, Any] | None = None) -> None:
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(
                f"SentencePiece model {model_file!r} not found. Point at the `{MODEL_FILE}` of an InternLM2 "
                "checkpoint (it ships beside config.json in the HF folder).")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(model_file)
        except Exception as err:  # sentencepiece raises OSError/RuntimeError with a terse message
            raise TokenizerError(f"{model_file!r} is not a valid SentencePiece model: {err}") from err
        self._model_file = model_file
        self._config = dict(config) if config is not None else None
        n = self._sp.get_piece_size()

        special_tokens = dict(special_tokens or {})
        # <unk>, <s>, </s> are special (split out of text, shown/skipped on decode) even when a config omits
        # them, as in HF; their ids come from the model's own control pieces.
        for name, sp_id in ((unk_token, self._sp.unk_id()), (bos_token, self._sp.bos_id()),
                            (eos_token, self._sp.eos_id())):
            if name not in special_tokens and sp_id >= 0 and self._sp.id_to_piece(sp_id) == name:
                special_tokens[name] = sp_id
        for name, idx in special_tokens.items():
            if not isinstance(name, str) or not name:
                raise TokenizerError(f"special token names must be non-empty strings, got {name!r}")
            if not isinstance(idx, int) or not 0 <= idx < n:
                raise TokenizerError(
                    f"special token {name!r} has id {idx!r}, outside the model's vocabulary [0, {n}); the "
                    f"tokenizer_config.json does not belong to this {MODEL_FILE}")
        self._special: dict[str, int] = dict(special_tokens)
        self._special_by_id: dict[int, str] = {}
        for name, idx in self._special.items():
            self._special_by_id.setdefault(idx, name)
        # Longest first so that a token that is a prefix of another (none in InternLM2) cannot shadow it.
        names = sorted(self._special, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

        self._bos_token, self._eos_token, self._unk_token = bos_token, eos_token, unk_token
        self._pad_token = pad_token if pad_token is not None else eos_token
        self._bos_id = self._lookup_control(bos_token, self._sp.bos_id(), "bos")
        self._eos_id = self._lookup_control(eos_token, self._sp.eos_id(), "eos")
        self._pad_id = self._lookup_control(self._pad_token, self._eos_id, "pad")
        self._unk_id = self._sp.unk_id()
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self._table: tuple[list[int], list[Any]] | None = None
        self._strip_leading_space: bool | None = None

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, require_chat_tokens: bool = True) -> Tokenizer:
        """Load `path/tokenizer.model` with the special-token table of `path/tokenizer_config.json`.

        require_chat_tokens=True (default) insists that the config names all six chat tokens
        (<|im_start|>, <|im_end|>, ...), as every InternLM2 chat release does; pass False for a base-model
        tokenizer that has none (chat rendering then cannot be tokenised correctly).
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (or is not a folder). Pass "
                                    f"the HF checkpoint folder that holds {MODEL_FILE} and {CONFIG_FILE}.")
        model_file = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(model_file):
            present = sorted(os.listdir(path))[:20]
            raise FileNotFoundError(
                f"{model_file!r} is missing (the folder holds {present}). InternLM2 uses a SentencePiece "
                f"{MODEL_FILE}; copy it from the HF release (e.g. internlm/internlm2-chat-7b) into {path!r}.")
        config_file = os.path.join(path, CONFIG_FILE)
        config: dict[str, Any] = {}
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise TokenizerError(f"cannot read {config_file!r}: {err}. Restore it from the HF release.") \
                    from err
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_file!r} must hold a JSON object, got {type(config).__name__}")
        elif require_chat_tokens:
            raise FileNotFoundError(
                f"{config_file!r} is missing. InternLM2 names its chat special tokens (<|im_start|>, "
                f"<|im_end|>, ...) only in {CONFIG_FILE} (`added_tokens_decoder`); copy that file from the "
                f"HF release (e.g. internlm/internlm2-chat-7b) into {path!r}, or load with "
                "require_chat_tokens=False for plain-text (base model) use.")

        special: dict[str, int] = {}
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerError(
                f"`added_tokens_decoder` in {config_file!r} must be an object of id -> token")
        for key, entry in decoder.items():
            try:
                idx = int(key)
            except ValueError:
                raise TokenizerError(
                    f"`added_tokens_decoder` key {key!r} in {config_file!r} is not an id") from None
            name = _token_content(entry)
            if name:
                special[name] = idx
        missing = [t for t in CHAT_SPECIAL_TOKENS if t not in special]
        if require_chat_tokens and missing:
            raise TokenizerError(
                f"{config_file!r} does not name the chat special tokens {missing} in `added_tokens_decoder`. "
                "InternLM2 chat tokenizers map them to the last ids of the vocab (92538..92543: <|plugin|>, "
                "<|interpreter|>, <|action_end|>, <|action_start|>, <|im_end|>, <|im_start|>). Use the "
                f"{CONFIG_FILE} of an InternLM2 chat release (e.g. internlm/internlm2-chat-7b), or load with "
                "require_chat_tokens=False if you only need plain text.")
        bos = _token_content(config.get("bos_token")) or BOS
        eos = _token_content(config.get("eos_token")) or EOS
        unk = _token_content(config.get("unk_token")) or UNK
        pad = _token_content(config.get("pad_token"))
        tok = cls(model_file, special, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                  add_bos_token=bool(config.get("add_bos_token", True)),
                  add_eos_token=bool(config.get("add_eos_token", False)), config=config)
        tok.source_dir = path  # the folder an export copies the tokenizer files from
        return tok

    def _lookup_control(self, name: str, fallback: int, what: str) -> int:
        if name in self._special:
            return self._special[name]
        idx = self._sp.piece_to_id(name)
        if self._sp.id_to_piece(idx) == name:
            return idx
        if fallback >= 0:
            return fallback
        raise TokenizerError(f"{what} token {name!r} is neither a special token nor a piece of the model")

    # ----- properties ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def special_tokens(self) -> dict[str, int]:
        """A copy of the special-token table, name -> id."""
        return dict(self._special)

    @property
    def sp_model(self) -> spm.SentencePieceProcessor:
        return self._sp

    def _chat_id(self, name: str) -> int:
        if name not in self._special:
            raise TokenizerError(
                f"this tokenizer has no id for {name!r}: its tokenizer_config.json does not name the "
                "InternLM2 chat tokens. Load the tokenizer of a chat release with Tokenizer.from_dir(path).")
        return self._special[name]

    @property
    def im_start_id(self) -> int:
        return self._chat_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._chat_id(IM_END)

    @property
    def action_start_id(self) -> int:
        return self._chat_id(ACTION_START)

    @property
    def action_end_id(self) -> int:
        return self._chat_id(ACTION_END)

    @property
    def plugin_id(self) -> int:
        return self._chat_id(PLUGIN)

    @property
    def interpreter_id(self) -> int:
        return self._chat_id(INTERPRETER)

    def stop_token_ids(self, tools: bool = False) -> list[int]:
        """Ids that end a chat reply: </s> and <|im_end|>, plus <|action_end|> when tools are enabled."""
        ids = [self.eos_id, self.im_end_id]
        if tools:
            ids.append(self.action_end_id)
        return ids

    def token_id(self, token: str) -> int:
        """Id of a special-token string or of a single piece of the model; KeyError if it is neither."""
        if token in self._special:
            return self._special[token]
        idx = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(idx) != token:
            raise KeyError(f"{token!r} is neither a special token ({sorted(self._special)}) nor a single "
                           "piece of the SentencePiece model; use encode() for text")
        return idx

    def id_to_token(self, idx: int) -> str:
        """The special-token name of `idx` if it has one, else its raw piece (e.g. '▁the', '<0xE4>')."""
        self._check_id(idx)
        return self._special_by_id.get(idx) or self._sp.id_to_piece(idx)

    def is_special(self, idx: int) -> bool:
        return idx in self._special_by_id

    # ----- encode -------------------------------------------------------------------------------------
    def _split(self, text: str, parse_special: bool) -> list[str | int]:
        """Text -> alternating plain strings and special-token ids (empty strings dropped)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if not parse_special or self._split_re is None:
            return [text] if text else []
        parts: list[str | int] = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:
                parts.append(self._special[part])
            elif part:
                parts.append(part)
        return parts

    def _finish(self, ids: list[int], add_bos: bool | None, add_eos: bool | None) -> list[int]:
        add_bos = self.add_bos_token if add_bos is None else add_bos
        add_eos = self.add_eos_token if add_eos is None else add_eos
        # A rendered chat prompt already starts with "<s>"; adding another would give the double-BOS that
        # silently shifts scores (a common evaluation bug), so BOS is only prepended when absent.
        if add_bos and not (ids and ids[0] == self._bos_id):
            ids.insert(0, self._bos_id)
        if add_eos:
            ids.append(self._eos_id)
        return ids

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None, *,
               parse_special: bool = True) -> list[int]:
        """Text -> ids. Special-token strings in `text` become their single ids (parse_special=False
        treats them as plain text). add_bos/add_eos default to the config (InternLM2: BOS yes, EOS no);
        BOS is not added again when the text itself starts with "<s>"."""
        ids: list[int] = []
        for part in self._split(text, parse_special):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self._sp.encode(part, out_type=int))
        return self._finish(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None, add_eos: bool | None = None, *,
                     parse_special: bool = True, num_threads: int = -1) -> list[list[int]]:
        """Like encode() for many texts; the plain stretches go to SentencePiece in one threaded call."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings; use encode() for a single string")
        split = [self._split(t, parse_special) for t in texts]
        plain = [p for parts in split for p in parts if isinstance(p, str)]
        encoded = iter(self._sp.encode(plain, out_type=int, num_threads=num_threads) if plain else [])
        out = []
        for parts in split:
            ids: list[int] = []
            for part in parts:
                if isinstance(part, int):
                    ids.append(part)
                else:
                    ids.extend(next(encoded))
            out.append(self._finish(ids, add_bos, add_eos))
        return out

    # ----- decode -------------------------------------------------------------------------------------
    def _check_id(self, idx: int) -> None:
        if not 0 <= idx < self.vocab_size:
            raise TokenizerError(f"token id {idx} is outside the vocabulary [0, {self.vocab_size})")

    def _surface_table(self) -> tuple[list[int], list[Any]]:
        """(kind, value) per id: _TEXT -> str, _BYTE -> int, _EMPTY -> None, _SPECIAL -> name. Built once."""
        if self._table is None:
            sp, n = self._sp, self.vocab_size
            pieces = sp.id_to_piece(list(range(n)))
            kinds, values = [_TEXT] * n, [None] * n
            unk_surface = sp.decode([self._unk_id]) if self._unk_id >= 0 else ""
            for i, piece in enumerate(pieces):
                if i in self._special_by_id:
                    kinds[i], values[i] = _SPECIAL, self._special_by_id[i]
                elif sp.is_byte(i):
                    kinds[i], values[i] = _BYTE, int(piece[3:5], 16)  # "<0xAB>"
                elif sp.is_control(i) or sp.is_unused(i):
                    kinds[i] = _EMPTY
                elif sp.is_unknown(i):
                    values[i] = unk_surface
                else:
                    values[i] = piece.replace("\u2581", " ")
            self._table = (kinds, values)
            # Models trained with a dummy prefix drop the "▁" of the first piece on decode; InternLM2's does
            # not. Ask sentencepiece once instead of reading the normalizer spec (that needs protobuf).
            self._strip_leading_space = False
            for i, piece in enumerate(pieces):
                if kinds[i] == _TEXT and piece.startswith("\u2581"):
                    self._strip_leading_space = not sp.decode([i]).startswith(" ")
                    break
        return self._table

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text. Special tokens appear as their names (e.g. "<|im_end|>", "<s>") unless skipped."""
        detok = IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)
        parts = [detok.push(int(i)) for i in ids]
        parts.append(detok.flush())
        return "".join(parts)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # ----- save ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into `path` (created).

        The config keeps every field of the one this tokenizer was loaded from (chat_template, auto_map, ...)
        and rewrites the special-token fields from the current table, so HF export can reuse the folder.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        target = os.path.join(path, MODEL_FILE)
        if os.path.abspath(target) != os.path.abspath(self._model_file):
            if os.path.isfile(self._model_file):
                shutil.copyfile(self._model_file, target)
            else:
                with open(target, "wb") as f:
                    f.write(self._sp.serialized_model_proto())
        config = dict(self._config or {})
        old = config.get("added_tokens_decoder") or {}
        decoder = {}
        for name, idx in sorted(self._special.items(), key=lambda kv: kv[1]):
            entry = old.get(str(idx)) if isinstance(old.get(str(idx)), dict) else {}
            decoder[str(idx)] = {"content": name, "lstrip": entry.get("lstrip", False),
                                 "normalized": entry.get("normalized", False),
                                 "rstrip": entry.get("rstrip", False),
                                 "single_word": entry.get("single_word", False),
                                 "special": entry.get("special", True)}
        additional = [t for t in reversed(CHAT_SPECIAL_TOKENS) if t in self._special]
        config.update({
            "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": decoder, "bos_token": self._bos_token, "eos_token": self._eos_token,
            "pad_token": self._pad_token, "unk_token": self._unk_token,
        })
        config.setdefault("clean_up_tokenization_spaces", False)
        config.setdefault("tokenizer_class", "InternLM2Tokenizer")
        if additional:
            config["additional_special_tokens"] = additional
        with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        special_map: dict[str, Any] = {"bos_token": self._bos_token, "eos_token": self._eos_token,
                                       "pad_token": self._pad_token, "unk_token": self._unk_token}
        if additional:
            special_map["additional_special_tokens"] = additional
        with open(os.path.join(path, SPECIAL_MAP_FILE), "w", encoding="utf-8") as f:
            json.dump(special_map, f, indent=2, ensure_ascii=False)
        return path

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos_id}, eos={self._eos_id}, "
                f"special={len(self._special)})")


class IncrementalDetokenizer:
    """Streaming ids -> text: `push(id)` returns the new text, `flush()` the rest at the end.

    Bytes of a character split over byte-fallback pieces (<0xE4><0xB8><0xAD> = "中") are held back until
    the character is complete, so no returned string ends in half a character and no prefix shows a
    U+FFFD that the full decode would not have. Each push costs O(1) (a table lookup and at most 4 held
    bytes), never a re-decode of the sequence. "".join(pushes) + flush() == tokenizer.decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._kinds, self._values = tokenizer._surface_table()
        self._strip = bool(tokenizer._strip_leading_space)
        self._skip = skip_special_tokens
        self._pending = bytearray()  # bytes of the current byte-piece run not yet turned into text
        self._at_start = True  # nothing visible emitted yet (matters only for dummy-prefix models)
        self._n = len(self._kinds)

    def _emit(self, text: str) -> str:
        if self._at_start:
            # Like sentencepiece: the "expect a dummy-prefix space" state lasts until some piece has a
            # non-empty surface, so a lone "▁" first piece is swallowed and the next one is stripped too.
            if self._strip and text.startswith(" "):
                text = text[1:]
            if text:
                self._at_start = False
        return text

    def _drain(self, final: bool) -> str:
        if not self._pending:
            return ""
        text, used = _decode_byte_run(self._pending, final)
        del self._pending[:used]
        if text:
            self._at_start = False
        return text

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < self._n:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {self._n})")
        kind = self._kinds[token_id]
        if kind == _BYTE:
            self._pending.append(self._values[token_id])
            return self._drain(final=False)
        head = self._drain(final=True)  # a non-byte piece ends the byte run
        if kind == _TEXT:
            return head + self._emit(self._values[token_id])
        if kind == _SPECIAL and not self._skip:
            # Special names are emitted verbatim; they do not count as the first piece for "▁" stripping,
            # matching sentencepiece, which never sees them (they are not pieces it decodes).
            return head + self._values[token_id]
        return head

    def is_byte(self, token_id: int) -> bool:
        """True for a byte-fallback piece ("<0xE4>"): its text may be held back until its character ends."""
        return 0 <= token_id < self._n and self._kinds[token_id] == _BYTE

    @property
    def held_bytes(self) -> int:
        """Bytes of an unfinished character held back (pushed, not yet returned as text)."""
        return len(self._pending)

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(int(t)) for t in token_ids)

    def flush(self) -> str:
        """Text still held back (an unfinished character becomes U+FFFD per byte, as decode() does)."""
        return self._drain(final=True)
