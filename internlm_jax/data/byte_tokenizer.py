"""A byte-level tokenizer: id 0 pad, 1 BOS, 2 EOS, then the 256 byte values (vocab 259).

It needs no model file, so tests, the tiny pre-training config and the demo can tokenise text anywhere.
It has the same duck-typed surface the data pipeline uses from `internlm_jax.tokenizer.Tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


def load_tokenizer(spec: str, what: str = "data.tokenizer") -> Any:
    """`byte` is this byte-level tokenizer (vocab 259, no files); anything else is a tokenizer folder."""
    import os

    from internlm_jax.config import ConfigError

    if not spec:
        raise ConfigError(f"{what} is empty: set it to a tokenizer folder (e.g. the InternLM2 HF checkpoint "
                          "folder) or to `byte` for the byte-level tokenizer")
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isdir(spec):
        raise ConfigError(f"{what} {spec!r} is not a folder; give a tokenizer folder (tokenizer.model + "
                          "tokenizer_config.json, e.g. an InternLM2 HF checkpoint) or `byte`")
    from internlm_jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(spec, require_chat_tokens=False)

