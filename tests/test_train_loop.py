"""The training loop: outputs, in-process resume, clear config errors, the CLI, and the tiny config's
learning (slow)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from internlm_jax.config import ConfigError
from internlm_jax.runconfig import load_config
from internlm_jax.train.config import TrainConfig
from internlm_jax.train.loop import TrainHooks, read_metrics, train
from internlm_jax.train.synthetic import SyntheticBatches

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs", "pretrain", "tiny.yaml")


def _synthetic_hooks(seq_len=32) -> TrainHooks:
    def source(cfg, model, process_index, process_count):
        return SyntheticBatches(model.vocab_size, seq_len, cfg.global_batch_size, seed=cfg.seed,
                                process_index=process_index, process_count=process_count)

    return TrainHooks(batch_source=source, devices=jax.devices()[:1])


def _cfg(tmp_path, *overrides: str) -> TrainConfig:
    base = [f"output_dir={tmp_path / 'run'}", "steps=4", "global_batch_size=4", "checkpoint_every=2",
            "peak_tflops=1.0", "progress=false", "optimizer.warmup_steps=1", "optimizer.lr=1e-3"]
    return load_config(TrainConfig, None, base + list(overrides))


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_loop_outputs_eval_and_resume_on_another_mesh(tmp_path):
    hooks = _synthetic_hooks()
    hooks.eval_source = hooks.batch_source
    res = train(_cfg(tmp_path, "eval_every=2", "eval_batches=2"), hooks)
    out = res.output_dir
    assert sorted(os.listdir(out)) == ["checkpoints", "config.yaml", "loss_curve.png", "metrics.jsonl",
                                       "summary.txt"]
    assert sorted(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()) == [2, 4]
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert {"loss", "grad_norm", "lr", "tokens_per_s", "step_time", "mfu", "tokens"} <= set(r)
        assert np.isfinite(r["loss"]) and r["tokens"] > 0 and r["tokens_per_s"] > 0
    assert recs[0]["lr"] == pytest.approx(1e-3)  # warmup of 1 step reaches the peak at the first update
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert "loss" in res.summary and "tokens/s" in res.summary

    # Same output_dir, more steps, and now 8 devices on (data=2, fsdp=2, tensor=2): resumes from the last
    # checkpoint (restored straight into the new shardings) instead of starting over.
    hooks8 = _synthetic_hooks()
    hooks8.devices = jax.devices()[:8]
    res2 = train(_cfg(tmp_path, "steps=6", "mesh={data: 2, fsdp: 2, tensor: 2}"), hooks8)
    assert res2.start_step == 4 and [r["step"] for r in res2.history] == [5, 6]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert int(res2.state["step"]) == 6
    assert res2.state["params"]["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert abs(res2.history[0]["loss"] - recs[-1]["loss"]) < 0.5  # continues, not a fresh init (~6.93)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_init_from_a_run_and_from_another_model(tmp_path):
    from internlm_jax.train.step import lm_loss

    hooks = _synthetic_hooks()
    first = train(_cfg(tmp_path, "steps=2"), hooks)
    # Continued pre-training: a new run (step 0) whose weights are the first run's final weights.
    cont = train(_cfg(tmp_path, "steps=1", f"output_dir={tmp_path / 'cont'}", f"init_from={first.output_dir}"),
                 hooks)
    assert cont.start_step == 0
    batch = next(SyntheticBatches(first.model_config.vocab_size, 32, 4, seed=0))
    n, d, _ = jax.jit(lambda p, b: lm_loss(p, b, first.model_config))(first.state["params"], batch)
    np.testing.assert_allclose(cont.history[0]["loss"], float(n / d), rtol=1e-6)
    # The same output_dir or init_from with a differently shaped model: a clear error, nothing compiled.
    other = "model.overrides={hidden_size: 32, intermediate_size: 64}"
    with pytest.raises(ConfigError, match=r"belongs to a different model \(hidden_size: checkpoint 64 vs this "
                                          r"run 32; intermediate_size"):
        train(_cfg(tmp_path, "steps=4", other), hooks)
    with pytest.raises(ConfigError, match=r"different model \(hidden_size: checkpoint 64 vs this run 32"):
        train(_cfg(tmp_path, "steps=1", other, f"output_dir={tmp_path / 'c2'}", f"init_from={first.output_dir}"),
              hooks)


def test_mesh_and_batch_errors(tmp_path):
    n = len(jax.devices())
    with pytest.raises(ConfigError, match=rf"mesh .* multiplies to 3 but there are {n} devices|does not divide "
                                          rf"{n} devices"):
        train(_cfg(tmp_path, "mesh={data: 3}"), TrainHooks(batch_source=_synthetic_hooks().batch_source))
    with pytest.raises(ConfigError, match=r"micro-batch has global_batch_size/grad_accum = 2 rows, which does not "
                                          r"split over the data\*fsdp = 4 batch shards"):
        train(_cfg(tmp_path, "mesh={data: 2, fsdp: 2, tensor: 2}", "global_batch_size=4", "grad_accum=2"),
              TrainHooks(batch_source=_synthetic_hooks().batch_source))


def test_missing_data_path_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path, f"data.sources={tmp_path / 'nope.jsonl'}", "data.tokenizer=byte", "data.seq_len=32")
    with pytest.raises(ConfigError, match=r"nope\.jsonl' does not exist.*generate_data=true"):
        train(cfg, TrainHooks(devices=jax.devices()[:1]))


def test_cli_errors_and_print_config(tmp_path, capsys):
    from internlm_jax.train.cli import main

    assert main(["--config", TINY, "optimizer.lrr=1"]) == 2
    assert "did you mean 'optimizer.lr'" in capsys.readouterr().err
    assert main(["--config", TINY, "--print-config", "steps=7", "--init-from", "/some/ckpt"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 7" in printed and "init_from: /some/ckpt" in printed


@pytest.mark.slow
def test_tiny_config_learns_below_unigram_entropy(tmp_path):
    from internlm_jax.data.byte_tokenizer import ByteTokenizer
    from internlm_jax.data.corpus import unigram_entropy

    corpus = tmp_path / "data" / "corpus.jsonl"
    cfg = load_config(TrainConfig, TINY, [f"output_dir={tmp_path / 'run'}", f"data.sources=[{{path: {corpus}}}]",
                                          "steps=150", "checkpoint_every=0", "progress=false"])
    res = train(cfg, TrainHooks(devices=jax.devices()[:1]))
    tok = ByteTokenizer()
    with open(corpus) as f:
        docs = [tok.encode(json.loads(line)["text"], add_bos=True) + [tok.eos_id] for line in f]
    h = unigram_entropy(docs)
    final = float(np.mean([r["loss"] for r in res.history[-10:]]))
    print(f"unigram entropy {h:.3f} nats/token; loss first {res.history[0]['loss']:.3f} final {final:.3f}")
    assert 2.0 < h < 4.5
    assert final < 0.5 * h


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_ctrl_c_saves_the_last_step_and_the_rerun_resumes_there(tmp_path):
    """KeyboardInterrupt inside the loop: the last completed step is checkpointed synchronously, one line says
    where a rerun resumes, and the rerun continues from that step (not from the last periodic checkpoint)."""
    hooks = _synthetic_hooks()

    def on_step(rec):
        if rec["step"] == 2:  # flushed after step 3's update returned: step 3 is the last completed one
            raise KeyboardInterrupt

    hooks.on_step = on_step
    with pytest.raises(KeyboardInterrupt, match=r"after step 3: checkpoint saved .* resume from step 3"):
        train(_cfg(tmp_path, "steps=6", "checkpoint_every=100"), hooks)
    ckpts = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert ckpts == [3]
    res = train(_cfg(tmp_path, "steps=6", "checkpoint_every=100"), _synthetic_hooks())
    assert res.start_step == 3 and [r["step"] for r in res.history] == [4, 5, 6]


def test_cli_turns_ctrl_c_into_one_line_and_exit_130(monkeypatch, capsys):
    from internlm_jax import cli
    from internlm_jax.train import cli as train_cli

    def interrupted(argv):
        raise KeyboardInterrupt("interrupted after step 7: checkpoint saved in X; run the same command to resume")

    monkeypatch.setattr(train_cli, "main", interrupted)
    assert cli.main(["train", "--config", "x.yaml"]) == 130
    err = capsys.readouterr().err
    assert "resume" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
