"""Reward model: Bradley-Terry training on the shipped preference pairs lowers the loss and raises pair accuracy;
the saved folder loads back and scores identically; `internlm-jax reward score` scores jsonl records."""

from __future__ import annotations

import pytest
import json

import jax
import numpy as np

from internlm_jax.cli import main as cli_main
from internlm_jax.data.sft import ChatByteTokenizer
from internlm_jax.runconfig import load_config
from internlm_jax.train.reward import load_pairs, load_reward_model, score_sequences, train_reward_model
from internlm_jax.train.rl_config import RewardTrainConfig

DEV = jax.devices()[:1]


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_reward_model_learns_shipped_pairs_and_round_trips(tmp_path):
    cfg = load_config(RewardTrainConfig, None, [
        "model.overrides={dtype: float32, remat: none}", "steps=40", "progress=false", "optimizer.lr=5e-3",
        "seq_len=256", f"output_dir={tmp_path}"])
    res = train_reward_model(cfg, devices=DEV)
    print(f"reward model on {int(res.after['pairs'])} shipped pairs: loss {res.before['loss']:.4f} -> "
          f"{res.after['loss']:.4f}, accuracy {res.before['accuracy']:.3f} -> {res.after['accuracy']:.3f}")
    assert res.after["loss"] < res.before["loss"] - 0.02
    assert res.after["accuracy"] > res.before["accuracy"] + 0.2

    config, params = load_reward_model(res.path)
    pairs = load_pairs(cfg.pairs, ChatByteTokenizer(), cfg.seq_len)[:4]
    seqs = [s for p in pairs for s in p]
    np.testing.assert_allclose(score_sequences(params, config, seqs), score_sequences(res.params, res.model, seqs),
                               atol=1e-5)

    src = tmp_path / "to_score.jsonl"
    src.write_text(json.dumps({"prompt": "Convert 5 km to m.", "response": "5000 m"}) + "\n"
                   + json.dumps({"prompt": [{"role": "user", "content": "Convert 5 km to m."}],
                                 "chosen": "5000 m", "rejected": "500 m"}) + "\n")
    out = tmp_path / "scored.jsonl"
    assert cli_main(["reward", "score", "--model", res.path, "--input", str(src), "--output", str(out),
                     "--tokenizer", "byte"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert np.isfinite(recs[0]["score"]) and {"chosen_score", "rejected_score"} <= set(recs[1])
    assert cli_main(["reward", "score", "--model", str(tmp_path / "nope"), "--input", str(src)]) == 2
