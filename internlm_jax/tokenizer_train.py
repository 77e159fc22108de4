"""Train a SentencePiece BPE tokenizer with InternLM2's settings and write an InternLM2-shaped tokenizer folder.

The release keeps its chat special tokens as ordinary pieces `[UNUSED_TOKEN_141..146]` at the last six ids and
names them only in tokenizer_config.json (`added_tokens_decoder`); the folder written here has the same shape,
so `Tokenizer.from_dir` reads it exactly like a release folder. Used by the demo and the tests.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable

# The chat special tokens in the order of their ids in the release (92538..92543 there; the last 6 ids here).
CHAT_SPECIAL_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                       "<|im_start|>")
RAW_SPECIAL_PIECES = tuple(f"[UNUSED_TOKEN_{i}]" for i in range(141, 147))


def train_model_proto(sentences: Iterable[str] | list[str], vocab_size: int,
                      coverages: tuple[float, ...] = (0.9995, 0.995, 0.98)) -> bytes:
    """A serialized sentencepiece model with the six chat pieces appended at the end of the vocab."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf

    sentences = list(sentences)
    last_err: Exception | None = None
    for coverage in coverages:
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=buf, model_type="bpe",
                vocab_size=vocab_size - len(RAW_SPECIAL_PIECES),
                # InternLM2's settings: keep text exactly as written (identity normalizer, no dummy prefix,
                # no whitespace squeezing), digits always single pieces, unseen characters as byte pieces.
                byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
                remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
                character_coverage=coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                minloglevel=2)
            break
        except RuntimeError as err:
            last_err = err
            if "required_chars" not in str(err) and "Vocabulary size" not in str(err):
                raise
    else:
        raise ValueError(f"could not train a {vocab_size}-piece tokenizer on this text ({last_err}); use a smaller "
                         "vocab_size or more text")
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    # Sentencepiece puts user_defined_symbols right after the control pieces; the release has its chat
    # pieces at the very end, so append them there as USER_DEFINED pieces (matched whole, never merged).
    for piece in RAW_SPECIAL_PIECES:
        new = proto.pieces.add()
        new.piece = piece
        new.score = 0.0
        new.type = pb.ModelProto.SentencePiece.USER_DEFINED
    if len(proto.pieces) != vocab_size:
        raise ValueError(f"trained tokenizer has {len(proto.pieces)} pieces, wanted {vocab_size}: the text has too "
                         "few distinct merges; lower vocab_size")
    return proto.SerializeToString()


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def tokenizer_config(vocab_size: int, *, chat_tokens: bool = True) -> dict:
    """An InternLM2-release-shaped tokenizer_config.json for a vocab of `vocab_size` pieces."""
    decoder = {"0": _token_entry("<unk>"), "1": _token_entry("<s>"), "2": _token_entry("</s>")}
    if chat_tokens:
        first = vocab_size - len(CHAT_SPECIAL_TOKENS)
        for offset, name in enumerate(CHAT_SPECIAL_TOKENS):
            decoder[str(first + offset)] = _token_entry(name)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>",
        "chat_template": ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
                          "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    if chat_tokens:
        config["additional_special_tokens"] = list(reversed(CHAT_SPECIAL_TOKENS))  # release order
    return config


def write_tokenizer_dir(path: str | os.PathLike, model_proto: bytes, vocab_size: int, *,
                        chat_tokens: bool = True) -> str:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json in `path`."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(model_proto)
    config = tokenizer_config(vocab_size, chat_tokens=chat_tokens)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    if chat_tokens:
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)
    return path


def train_tokenizer(texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 1024) -> str:
    """Train on `texts` and write the folder; returns its path."""
    return write_tokenizer_dir(path, train_model_proto(texts, vocab_size), vocab_size)
