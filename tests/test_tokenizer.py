"""Tokenizer: special-token splitting from the config, sentencepiece-exact decoding, streaming detokeniser."""

from __future__ import annotations

import io
import json
import os
import random
import shutil

import pytest
import sentencepiece as spm
from fixtures import CHAT_SPECIAL_TOKENS, _corpus, make_tokenizer_dir

from internlm_jax.chat import render
from internlm_jax.config import get_preset
from internlm_jax.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

TEXTS = [
    "Hello, world! How are you?",
    "你好，世界！今天天气很好。书生·浦语，欢迎使用。",
    "Emoji: 🦜🦀🙂👍🏽 and flags 🇨🇳🇬🇧; ZWJ family 👩\u200d👩\u200d👧.",
    "def add(a, b):\n    return a + b  # 返回和\n\n\tTabs\tand  double  spaces ",
    "  leading spaces and trailing newline\n",
    "Digits 0123456789 and 3.14159e-5, 繁體字與罕見字：龘靐齉。",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"), vocab_size=1024)


@pytest.fixture(scope="module")
def tok(tok_dir: str) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def test_fixture_matches_release_layout(tok: Tokenizer, tok_dir: str) -> None:
    assert tok.vocab_size == 1024 == get_preset("internlm2-tiny").vocab_size
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(1018, 1024)] == [f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)]
    assert [tok.token_id(t) for t in CHAT_SPECIAL_TOKENS] == list(range(1018, 1024))
    assert sum(sp.is_byte(i) for i in range(sp.get_piece_size())) == 256


def test_special_tokens_encode_to_single_ids(tok: Tokenizer) -> None:
    # Raw sentencepiece splits the string into several pieces; the tokenizer must not.
    assert len(tok.sp_model.encode("<|im_start|>")) > 1
    assert tok.encode("<|im_start|>", add_bos=False) == [tok.im_start_id] == [1023]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n", add_bos=False)
    assert ids[0] == tok.im_start_id and tok.im_end_id in ids
    assert ids.count(tok.im_end_id) == 1 and ids.count(tok.im_start_id) == 1
    for name in CHAT_SPECIAL_TOKENS:
        assert tok.encode(f"a{name}b", add_bos=False).count(tok.token_id(name)) == 1
    # parse_special=False treats them as text.
    assert tok.im_start_id not in tok.encode("<|im_start|>", add_bos=False, parse_special=False)


def test_special_ids_come_from_config_not_constants(tok_dir: str, tmp_path) -> None:
    other = tmp_path / "swapped"
    shutil.copytree(tok_dir, other)
    cfg_path = other / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    dec = cfg["added_tokens_decoder"]
    dec["1022"]["content"], dec["1023"]["content"] = "<|im_start|>", "<|im_end|>"
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(other)
    assert tok.encode("<|im_start|>", add_bos=False) == [1022]
    assert tok.im_end_id == 1023 and tok.decode([1023]) == "<|im_end|>"


def test_bos_handling(tok: Tokenizer) -> None:
    assert tok.encode("hi")[0] == tok.bos_id  # the config says add_bos_token=True
    assert tok.encode("hi", add_bos=False)[0] != tok.bos_id
    assert tok.encode("hi", add_eos=True)[-1] == tok.eos_id
    # A rendered chat already starts with <s>: it must not get a second BOS.
    ids = tok.encode(render([{"role": "user", "content": "hi"}]))
    assert ids[0] == tok.bos_id and ids[1] == tok.im_start_id


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert ids == tok.sp_model.encode(text)  # no special strings in it: plain sentencepiece
    assert tok.decode(tok.encode(text)) == "<s>" + text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_chat_roundtrip(tok: Tokenizer) -> None:
    prompt = render([{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "天气 🙂?"}])
    ids = tok.encode(prompt)
    assert tok.decode(ids) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == "system\n你是助手。\nuser\n天气 🙂?\nassistant\n"


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = TEXTS + ["", "<|im_start|>", "x<|im_end|><|im_end|>y"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=False) == [tok.encode(t, add_bos=False) for t in texts]
    with pytest.raises(TypeError, match="sequence of strings"):
        tok.encode_batch("not a list")


def test_decode_matches_sentencepiece_on_random_ids(tok: Tokenizer) -> None:
    """Our table decoder reproduces sp.decode, including broken byte runs (one U+FFFD per bad byte)."""
    rng = random.Random(0)
    sp = tok.sp_model
    byte_ids = [i for i in range(tok.vocab_size) if sp.is_byte(i)]
    text_ids = list(range(3, 1018))
    for _ in range(2000):
        ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.choice(text_ids + [1, 2])
               for _ in range(rng.randint(1, 10))]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids), ids


def test_decode_matches_sentencepiece_with_dummy_prefix_model(tmp_path) -> None:
    """Models trained with add_dummy_prefix drop the first piece's '▁' on decode; we follow sentencepiece."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus(zh_chars=50)), model_writer=buf,
                                   model_type="bpe", vocab_size=700, byte_fallback=True, num_threads=1,
                                   character_coverage=0.98, minloglevel=2)
    path = tmp_path / "dp.model"
    path.write_bytes(buf.getvalue())
    tok = Tokenizer(path)
    sp = tok.sp_model
    space_id = sp.piece_to_id("\u2581")
    rng = random.Random(1)
    for _ in range(2000):
        ids = [rng.choice([rng.randrange(3, 259), rng.randrange(3, 700), space_id, 1, 2])
               for _ in range(rng.randint(1, 8))]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids), ids
        detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
        assert "".join(detok.push(i) for i in ids) + detok.flush() == sp.decode(ids)


@pytest.mark.parametrize("text", [TEXTS[1], TEXTS[2], TEXTS[5], "书生·浦语 欢迎 🦜🦜 龘"])
def test_incremental_detokenizer_on_multibyte_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    assert any(tok.sp_model.is_byte(i) for i in ids), "test text must exercise byte-fallback pieces"
    detok = IncrementalDetokenizer(tok)
    so_far = ""
    held_back = False
    for i in ids:
        piece = detok.push(i)
        held_back |= piece == "" and tok.sp_model.is_byte(i)
        so_far += piece
        assert "\ufffd" not in so_far
        assert text.startswith(so_far)
    assert held_back  # some byte piece completed no character on its own
    assert so_far + detok.flush() == tok.decode(ids) == text


def test_incremental_detokenizer_equals_decode_on_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(2)
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp_model.is_byte(i)]
    for skip in (False, True):
        for _ in range(500):
            ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
                   for _ in range(rng.randint(0, 20))]
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            pieces = [detok.push(i) for i in ids] + [detok.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids


def test_decode_renders_and_skips_special_tokens(tok: Tokenizer) -> None:
    body = tok.encode("user\n你好", add_bos=False)
    ids = [tok.bos_id, tok.im_start_id, *body, tok.im_end_id, tok.eos_id]
    assert tok.decode(ids) == "<s><|im_start|>user\n你好<|im_end|></s>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        IncrementalDetokenizer(tok).push(-1)


def test_lookups_and_stop_ids(tok: Tokenizer) -> None:
    assert tok.stop_token_ids() == [2, tok.im_end_id]
    assert tok.stop_token_ids(tools=True) == [2, tok.im_end_id, tok.action_end_id]
    assert tok.token_id("<0xE4>") == tok.sp_model.piece_to_id("<0xE4>")
    assert tok.id_to_token(tok.im_start_id) == "<|im_start|>"
    assert tok.special_tokens["<|plugin|>"] == tok.plugin_id == 1018
    assert tok.interpreter_id == 1019 and tok.action_start_id == 1021
    with pytest.raises(KeyError, match="neither a special token"):
        tok.token_id("<|not_a_token|>")
    with pytest.raises(TypeError, match="must be str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_missing_chat_tokens_is_a_clear_error(tmp_path) -> None:
    path = make_tokenizer_dir(tmp_path / "base", chat_tokens=False)
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(path)
    msg = str(info.value)
    for name in CHAT_SPECIAL_TOKENS:
        assert name in msg
    assert "added_tokens_decoder" in msg and "require_chat_tokens=False" in msg
    base = Tokenizer.from_dir(path, require_chat_tokens=False)
    assert base.decode(base.encode("plain text")) == "<s>plain text"
    with pytest.raises(TokenizerError, match="no id for '<\\|im_end\\|>'"):
        _ = base.im_end_id


def test_missing_files_are_clear_errors(tok_dir: str, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), no_model)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model.*missing.*tokenizer_config\.json"):
        Tokenizer.from_dir(no_model)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(os.path.join(tok_dir, "tokenizer.model"), no_config)
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json.*missing.*added_tokens_decoder"):
        Tokenizer.from_dir(no_config)
    assert Tokenizer.from_dir(no_config, require_chat_tokens=False).bos_id == 1
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path / "absent.model")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"not a model")
    shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), bad)
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        Tokenizer.from_dir(bad)
    shutil.copy(os.path.join(tok_dir, "tokenizer.model"), bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_dir(bad)


def test_special_id_out_of_range_is_an_error(tok_dir: str, tmp_path) -> None:
    other = tmp_path / "bigids"
    shutil.copytree(tok_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["92543"] = cfg["added_tokens_decoder"].pop("1023")  # a release config
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="92543.*does not belong"):
        Tokenizer.from_dir(other)


def test_save_roundtrip(tok: Tokenizer, tok_dir: str, tmp_path) -> None:
    out = tok.save(tmp_path / "saved")
    assert sorted(os.listdir(out)) == ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    def read(folder: str, name: str) -> bytes:
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()

    assert read(out, "tokenizer.model") == read(tok_dir, "tokenizer.model")
    cfg = json.loads(read(out, "tokenizer_config.json"))
    orig = json.loads(read(tok_dir, "tokenizer_config.json"))
    assert cfg["added_tokens_decoder"] == orig["added_tokens_decoder"]
    assert cfg["chat_template"] == orig["chat_template"] and cfg["auto_map"] == orig["auto_map"]
    assert (cfg["add_bos_token"], cfg["add_eos_token"]) == (True, False)
    special_map = json.loads(read(out, "special_tokens_map.json"))
    assert special_map["eos_token"] == "</s>" and "<|im_end|>" in special_map["additional_special_tokens"]
    again = Tokenizer.from_dir(out)
    assert again.special_tokens == tok.special_tokens
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    # A tokenizer built from parts (no config) saves a loadable folder too.
    bare = Tokenizer(os.path.join(tok_dir, "tokenizer.model"), tok.special_tokens)
    reloaded = Tokenizer.from_dir(bare.save(tmp_path / "bare"))
    assert reloaded.special_tokens == tok.special_tokens and reloaded.encode("<|im_end|>") == [1, 1022]
