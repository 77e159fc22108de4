"""Server-sent events, a streaming filter for special-token text, and token surfaces for logprobs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# JSON leaves these unescaped, but clients that split a stream with str.splitlines() (httpx's iter_lines,
# for one) would cut an SSE line at them: escape them, which is still the same JSON string.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


def sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


class ChunkEncoder:
    """SSE chunks of one response: the fields every chunk repeats are encoded once, per chunk only the
    choices (a chunk is sent per token per stream, so this is the server's hottest JSON)."""

    def __init__(self, base: dict[str, Any], include_usage: bool):
        head = _dumps(base)[:-1]  # '{"id":...,"model":...' without the closing brace
        self._head = ("data: " + head + ',"choices":[').encode()
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def choice(self, choice: dict[str, Any]) -> bytes:
        return self._head + _dumps(choice).encode() + self._tail


class TextFilter:
    """Removes whole occurrences of `strings` (special-token names) from streamed text.

    A tail that could still become one of them ("<|im_st") is held back until the next piece decides;
    `flush()` releases it at the end. `"".join(feed(...)) + flush()` equals `remove(text)` (one
    left-to-right scan, longest name first), however the text was split.
    """

    def __init__(self, strings: Iterable[str]):
        self.strings = sorted({s for s in strings if s}, key=len, reverse=True)
        self._prefixes = {s[:k] for s in self.strings for k in range(1, len(s))}
        self._firsts = {s[0] for s in self.strings}
        self._re = re.compile("|".join(map(re.escape, self.strings))) if self.strings else None
        self._longest = max((len(s) for s in self.strings), default=0)
        self._buf = ""

    def _clean(self, text: str) -> str:
        return self._re.sub("", text)

    def remove(self, text: str) -> str:
        return self._clean(text) if self._re is not None else text

    def feed(self, text: str) -> str:
        if not self.strings or (not self._buf and not any(c in text for c in self._firsts)):
            return text  # the common case: nothing that could start a special name
        buf = self._clean(self._buf + text)
        keep = 0
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            if buf[-k:] in self._prefixes:
                keep = k
                break
        self._buf = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


class TokenSurfaces:
    """Token id -> (text, utf-8 bytes) for logprobs: the piece with '▁' as a space, byte pieces as
    '<0xAB>' (text) / [0xAB] (bytes), special tokens by name. Distinct ids give distinct texts, so a
    top-logprobs dict keyed by text loses nothing (lm-eval compares tokens by this text)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        if self.tokenizer is None:
            out = (f"token_id:{token_id}", [])
        else:
            piece = self.tokenizer.id_to_token(token_id)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and \
                    not self.tokenizer.is_special(token_id):
                out = (piece, [int(piece[3:5], 16)])
            else:
                text = piece.replace("\u2581", " ")
                out = (text, list(text.encode("utf-8")))
        self._cache[token_id] = out
        return out

    def text(self, token_id: int) -> str:
        return self(token_id)[0]


__all__ = ["SSE_DONE", "SSE_HEADERS", "ChunkEncoder", "TextFilter", "TokenSurfaces", "sse"]
