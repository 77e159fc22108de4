"""Fine-tuning data: the InternLM2 training render (byte for byte, tool calls included), the assistant-only loss
mask in tokens and in packed rows, every record format, truncation that reports what it cut, packing, DPO pairs
and bad input naming file and line. No model is compiled here."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from internlm_jax.config import ConfigError
from internlm_jax.data.sft import (
    ChatByteTokenizer,
    PackedBatches,
    SFTDataConfig,
    build_rows,
    load_units,
    loss_spans,
    pack_best_fit,
    render_segments,
    tokenize_segments,
)
from internlm_jax.data.sources import DataError
from internlm_jax.runconfig import load_config
from internlm_jax.train.finetune_config import FinetuneConfig
from tests.fixtures import make_tokenizer_dir

WEATHER = {"type": "function", "function": {"name": "get_current_weather", "description": "Get the weather",
                                            "parameters": {"type": "object",
                                                           "properties": {"location": {"type": "string"}}}}}
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the weather in Shanghai?"},
    {"role": "assistant", "content": "I will look it up.", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Shanghai\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temperature\": 22}"},
    {"role": "assistant", "content": "It is 22 degrees and sunny."}]}
# The template of shared/INTERNLM2.md, written out by hand.
EXPECTED = (
    "<s><|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>system name=<|plugin|>\n"
    '[{"name": "get_current_weather", "description": "Get the weather", "parameters": {"type": "object", '
    '"properties": {"location": {"type": "string"}}}}]<|im_end|>\n'
    "<|im_start|>user\nWhat is the weather in Shanghai?<|im_end|>\n"
    "<|im_start|>assistant\nI will look it up.<|action_start|><|plugin|>\n"
    '{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}<|action_end|><|im_end|>\n'
    "<|im_start|>environment name=<|plugin|>\n{\"temperature\": 22}<|im_end|>\n"
    "<|im_start|>assistant\nIt is 22 degrees and sunny.<|im_end|>\n")
ANSWERS = [('I will look it up.<|action_start|><|plugin|>\n{"name": "get_current_weather", "parameters": '
            '{"location": "Shanghai"}}<|action_end|><|im_end|>'), "It is 22 degrees and sunny.<|im_end|>"]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    from internlm_jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(make_tokenizer_dir(tmp_path_factory.mktemp("tok"), 1024))


def _write(path, lines):
    with open(path, "w") as f:
        f.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return str(path)


def _cfg(*paths, **kw):
    return SFTDataConfig(sources=tuple(str(p) for p in paths), tokenizer="byte", **kw)


@pytest.mark.parametrize("tok_name", ["sentencepiece", "byte"])
def test_tool_chat_renders_byte_exact_and_loss_covers_only_the_answers(tok_name, sp_tok):
    tok = sp_tok if tok_name == "sentencepiece" else ChatByteTokenizer()
    segments = render_segments(TOOL_CHAT["messages"], TOOL_CHAT["tools"], "test")
    assert "".join(text for text, _ in segments) == EXPECTED
    assert [text for text, loss in segments if loss] == ANSWERS
    ids, loss = tokenize_segments(tok, segments)
    assert tok.decode(ids) == EXPECTED[:-1]  # the final "\n" is no target that counts: trimmed
    assert [tok.decode(ids[a:b]) for a, b in loss_spans(loss)] == ANSWERS
    # In a packed row the loss mask is 1 exactly where the *target* is an answer token.
    row = build_rows([(_seq(ids, loss),)], [[0]], len(ids) + 5, tok.pad_id)
    n = len(ids) - 1
    np.testing.assert_array_equal(row["loss_mask"][0, :n], loss[1:].astype(np.float32))
    assert not row["loss_mask"][0, n:].any()
    np.testing.assert_array_equal(row["targets"][0, :n], ids[1:])
    masked = row["targets"][0, :n][row["loss_mask"][0, :n] == 0]
    assert tok.decode(masked).count("<|im_start|>") == 6  # every header is outside the loss


def _seq(ids, loss):
    from internlm_jax.data.sft import Seq

    return Seq(ids, loss)


def test_formats_and_per_turn_loss_flags(tmp_path):
    tok = ChatByteTokenizer()
    path = _write(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": False},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"conversation": [{"system": "S", "input": "x", "output": "y"}, {"input": "z", "output": "w"}]},
        {"instruction": "Double.", "input": "21", "output": "42"},
        {"text": "plain <|im_end|> text"}])
    units, report = load_units(_cfg(path, seq_len=64), tok)
    got = [(tok.decode(u[0].ids), [tok.decode(u[0].ids[a:b]) for a, b in loss_spans(u[0].loss)]) for u in units]
    assert got[0] == (("<s><|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc"
                       "<|im_end|>\n<|im_start|>assistant\nd<|im_end|>"), ["d<|im_end|>"])
    assert got[1] == (("<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
                       "y<|im_end|>\n<|im_start|>user\nz<|im_end|>\n<|im_start|>assistant\nw<|im_end|>"),
                      ["y<|im_end|>", "w<|im_end|>"])
    assert got[2] == ("<s><|im_start|>user\nDouble.\n21<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
                      ["42<|im_end|>"])
    # Raw text: special-token strings stay text, loss on every target.
    text = units[3][0]
    assert tok.decode(text.ids) == "<s>plain <|im_end|> text</s>" and tok.im_end_id not in text.ids
    assert text.loss[1:].all()
    assert report.samples == 4 and report.records == 4
    # A .json list and a system prompt for chats without one.
    jpath = tmp_path / "alpaca.json"
    jpath.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}]))
    units, _ = load_units(_cfg(jpath, seq_len=64, system="Be brief."), tok)
    assert tok.decode(units[0][0].ids).startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")


def test_long_text_is_split_so_every_target_is_learned_once(tmp_path):
    tok = ChatByteTokenizer()
    path = _write(tmp_path / "t.jsonl", [{"text": "abcdefghij" * 5}])
    units, report = load_units(_cfg(path, seq_len=16), tok)
    assert report.split_texts == 1 and all(u[0].positions <= 16 for u in units)
    targets = np.concatenate([u[0].ids[1:] for u in units])
    np.testing.assert_array_equal(targets, tok.encode("abcdefghij" * 5, add_bos=True, add_eos=True)[1:])


def test_truncation_never_silently_cuts_the_first_answer(tmp_path):
    tok = ChatByteTokenizer()
    conv = {"conversation": [{"input": "q1", "output": "A" * 10}, {"input": "q2", "output": "B" * 40}]}
    long_first = {"conversation": [{"input": "q", "output": "C" * 80}]}
    path = _write(tmp_path / "c.jsonl", [conv, long_first])
    # turns: the first sample keeps its first turn; the second cannot keep its first answer and is dropped.
    units, report = load_units(_cfg(path, seq_len=48, truncation="turns"), tok)
    assert len(units) == 1 and report.truncated == 1 and report.dropped_too_long == 1
    assert tok.decode(units[0][0].ids).endswith("A" * 10 + "<|im_end|>")
    # cut: both are cut at seq_len, and the cut into the second sample's first answer is counted.
    units, report = load_units(_cfg(path, seq_len=48, truncation="cut"), tok)
    assert len(units) == 2 and report.truncated == 2 and report.cut_in_first_answer == 1
    assert all(u[0].positions == 48 for u in units)
    with pytest.raises(DataError, match=r"c\.jsonl line 1: .* exceed seq_len=48"):
        load_units(_cfg(path, seq_len=48, truncation="error"), tok)


def test_packing_keeps_samples_whole_and_resumes_exactly(tmp_path):
    tok = ChatByteTokenizer()
    recs = [{"messages": [{"role": "user", "content": f"q{i}" * (1 + i % 7)},
                          {"role": "assistant", "content": f"a{i}" * (1 + i % 5)}]} for i in range(60)]
    units, _ = load_units(_cfg(_write(tmp_path / "p.jsonl", recs), seq_len=128), tok)
    lengths = [u[0].positions for u in units]
    rows = pack_best_fit(lengths, 128, list(range(len(units))))
    assert sorted(u for r in rows for u in r) == list(range(len(units)))
    assert all(sum(lengths[u] for u in r) <= 128 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 128) + 1  # best fit: within one row of the lower bound here
    it = PackedBatches(units, 128, 4, pad_id=tok.pad_id, seed=3)
    seen = []
    for _ in range(it.batches_per_epoch(0)):
        b = next(it)
        for r in range(4):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                assert np.array_equal(pos[idx], np.arange(len(idx)))  # positions restart per sample
                seen.append(tuple(b["tokens"][r, idx]))
            assert (b["loss_mask"][r][seg == 0] == 0).all() and (b["targets"][r][seg == 0] == -1).all()
    assert len(seen) == len(set(seen)) > 0.8 * len(units)  # no sample twice; a partial last batch is dropped
    state = it.get_state()
    nxt = next(it)
    it2 = PackedBatches(units, 128, 4, pad_id=tok.pad_id, seed=3)
    it2.set_state(state)
    for k, v in next(it2).items():
        np.testing.assert_array_equal(v, nxt[k])
    with pytest.raises(ConfigError, match="another dataset"):
        PackedBatches(units[:-1], 128, 4, pad_id=tok.pad_id, seed=3).set_state(state)


def test_dpo_pairs_share_their_prompt(tmp_path):
    tok = ChatByteTokenizer()
    path = _write(tmp_path / "d.jsonl", [
        {"prompt": "Convert 3 km to m.", "chosen": "3000 m", "rejected": "300 m"},
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}])
    units, _ = load_units(_cfg(path, seq_len=128), tok, task="dpo")
    for chosen, rejected in units:
        assert (chosen.sign, rejected.sign) == (1, -1)
        first = loss_spans(chosen.loss)[0][0]
        assert loss_spans(rejected.loss)[0][0] == first
        np.testing.assert_array_equal(chosen.ids[:first], rejected.ids[:first])
    assert [tok.decode(u[0].ids[loss_spans(u[0].loss)[0][0]:]) for u in units] == ["3000 m<|im_end|>",
                                                                                   "hello<|im_end|>"]
    b = build_rows(units, [[0, 1]], 256, tok.pad_id, dpo=True)
    assert set(np.unique(b["pair_index"])) == {-1, 0, 1}
    assert set(np.unique(b["pair_sign"][b["segment_ids"] > 0])) == {-1.0, 1.0}


def test_bad_records_name_file_and_line(tmp_path):
    tok = ChatByteTokenizer()
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    cases = [("not json {", r"bad\.jsonl line 2: not valid JSON"),
             ({"conversation": [{"input": "q"}]}, r"bad\.jsonl line 2: conversation\[0\] lacks the field 'output'"),
             ({"messages": [{"role": "user", "content": "q"}]}, r"bad\.jsonl line 2: no assistant turn"),
             ({"instruction": "x"}, r"bad\.jsonl line 2: the alpaca record lacks the field 'output'"),
             ({"prompt": "p"}, r"line 2: .*tell the record format"),
             ({"messages": [{"role": "robot", "content": "q"}]}, r"bad\.jsonl line 2: .*role is 'robot'")]
    for bad, pattern in cases:
        path = _write(tmp_path / "bad.jsonl", [good, bad, good])
        with pytest.raises(DataError, match=pattern):
            load_units(_cfg(path, seq_len=64), tok)
        units, report = load_units(_cfg(path, seq_len=64, bad_records="skip"), tok)
        assert (len(units), report.skipped, report.records) == (2, 1, 3)
    with pytest.raises(DataError, match=r"line 1: the DPO record lacks the field 'rejected'"):
        load_units(_cfg(_write(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c"}]), seq_len=64), tok,
                   task="dpo")
    with pytest.raises(DataError, match="does not exist"):
        load_units(_cfg(tmp_path / "missing.jsonl"), tok)


def test_finetune_config_errors(tmp_path):
    data = f"dataset={{sources: [{tmp_path}/x.jsonl]}}"
    with pytest.raises(ConfigError, match=r"unknown LoRA targets|unknown lora.targets \['wq'\]"):
        load_config(FinetuneConfig, None, [data, "mode=lora", "lora.targets=[wq, w1]"])
    with pytest.raises(ConfigError, match="unknown config key 'lora.rnk'"):
        load_config(FinetuneConfig, None, [data, "lora.rnk=8"])
    with pytest.raises(ConfigError, match="needs a dataset section"):
        load_config(FinetuneConfig, None, [])
    with pytest.raises(ConfigError, match="on_the_fly needs mode lora or qlora"):
        load_config(FinetuneConfig, None, [data, "task=dpo", "dpo.reference=on_the_fly"])
    with pytest.raises(ConfigError, match="eval_dataset"):
        load_config(FinetuneConfig, None, [data, "eval_every=5"])
    cfg = load_config(FinetuneConfig, None, [data, "eval_every=5", f"eval_dataset={{sources: [{tmp_path}/y.jsonl]}}"])
    assert cfg.eval_every == 5 and cfg.dataset.sources[0].path.endswith("x.jsonl")


def test_shipped_configs_and_assets_load():
    root = os.path.join(os.path.dirname(__file__), "..", "configs", "finetune")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert {"tiny_sft.yaml", "tiny_lora.yaml", "tiny_qlora.yaml", "tiny_dpo.yaml",
            "internlm2_chat_7b_lora.yaml", "internlm2_chat_7b_qlora.yaml"} <= set(names)
    for name in names:
        cfg = load_config(FinetuneConfig, os.path.join(root, name))
        if name.startswith("internlm2_chat_7b"):
            assert (cfg.lora.rank, cfg.lora.alpha) == (64, 16.0)
    tok = ChatByteTokenizer()
    for src in ("assets:sft/tool_use.jsonl", "assets:sft/arithmetic.jsonl", "assets:sft/alpaca_double.json"):
        units, report = load_units(SFTDataConfig(sources=(src,), tokenizer="byte", seq_len=1024), tok)
        assert report.skipped == 0 and report.dropped_too_long == 0 and len(units) == report.records
