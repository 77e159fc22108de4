"""Incremental detokenisation and stop strings for one generated sequence.

Works with any `decode(ids) -> str` (a tokenizer's decode or a plain function). Text is produced the way
HF/vLLM do it incrementally: decode a short window of ids before and after the new token and emit the
difference, so multi-byte characters split across byte-fallback tokens are only emitted once complete (a
trailing U+FFFD means "wait for more"), and pieces whose rendering depends on their left neighbour come out
right. Stop strings may span tokens: the text is searched after every token, and while unfinished the last
len(longest stop) - 1 characters are held back so a stop string is never half-streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

DecodeFn = Callable[[list[int]], str]
_CONTEXT = 5  # prompt tokens used as left context for the first generated pieces


def resolve_decode_fn(tokenizer: object | None) -> DecodeFn | None:
    """A decode function from a tokenizer object (anything with .decode(ids)) or a plain callable."""
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "decode"):
        dec = tokenizer.decode
        return lambda ids: dec(list(ids))
    if callable(tokenizer):
        return tokenizer  # type: ignore[return-value]
    raise TypeError(f"tokenizer must have .decode(ids) or be a callable ids -> str, got {type(tokenizer)}")


class IncrementalText:
    """The growing output text of one sequence, its stop-string check, and the part safe to stream."""

    def __init__(self, decode: DecodeFn, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 include_stop: bool = False):
        self.decode = decode
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def push(self, token_id: int) -> bool:
        """Add one generated token; True if a stop string now appears (the text is cut at it)."""
        self.ids.append(int(token_id))
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return False  # an incomplete UTF-8 character (or nothing visible yet): wait for the next token
        old_len = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if not self.stop:
            return False
        start = max(0, old_len - self.hold)
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
            self.stopped = True
        return self.stopped

    def take(self, final: bool) -> str:
        """Text not yet handed out; while not final, hold back what could still start a stop string."""
        end = len(self.text) if final or self.stopped else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
