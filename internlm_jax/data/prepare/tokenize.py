"""The model's tokenizer inside the pipeline, and its fingerprint in the manifest.

Documents are encoded as plain text: special-token strings that occur in web text (`<|im_start|>`, `</s>`)
become ordinary pieces, never control ids. No BOS/EOS is stored; the training config adds them when it reads
the shards (data.add_bos / data.add_eos), as it does for text sources.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from internlm_jax.data.byte_tokenizer import load_tokenizer

TOKEN_DTYPE = np.dtype("<i4")  # what one record of a shard holds: the document's ids, little-endian int32


def tokenizer_fingerprint(spec: str) -> dict[str, Any]:
    """{spec, vocab_size, sha256 of tokenizer.model (or "byte")}: the grain side checks it before training."""
    tok = load_tokenizer(spec)
    if spec == "byte":
        digest = "byte"
    else:
        with open(os.path.join(spec, "tokenizer.model"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return {"spec": spec, "vocab_size": int(tok.vocab_size), "sha256": digest}


def encode_plain(tokenizer: Any, text: str) -> np.ndarray:
    """The document's ids, without BOS/EOS and with special-token strings read as text."""
    if hasattr(tokenizer, "sp_model"):
        ids = tokenizer.encode(text, add_bos=False, add_eos=False, parse_special=False)
    else:
        ids = tokenizer.encode(text, add_bos=False)
    return np.asarray(ids, dtype=TOKEN_DTYPE)
