"""A byte-level tokenizer: id 0 pad, 1 BOS, 2 EOS, then the 256 byte values (vocab 259).

It needs no model file, so tests, the tiny pre-training config and the demo can tokenise text anywhere.
It has the same duck-typed surface the data pipeline uses from `internlm_jax.tokenizer.Tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3  # byte b has id b + offset
    vocab_size = 256 + offset

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")
