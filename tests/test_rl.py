"""Online RL: GRPO advantages, PPO's clipped objective and GAE against hand-computed values; the weight sync
(the engine's log-probs after a sync equal the trainer's forward, with no copy); a GRPO run from a quickly
SFT-trained tiny model on held-out unit conversions (before/after, KL bounded); PPO and LoRA smoke runs."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.runconfig import load_config
from internlm_jax.train.rl import clipped_policy_loss, clipped_value_loss, gae, grpo_advantages, k3_kl, token_stats
from internlm_jax.train.rl_config import RLConfig
from internlm_jax.train.rl_loop import RLTrainer, rollout_rows, train_rl
from internlm_jax.train.rl_rewards import Reference, math_answer, tool_call, unit_conversion

ROOT = os.path.join(os.path.dirname(__file__), "..")
DEV = jax.devices()[:1]
TINY = os.path.join(ROOT, "configs", "rl", "tiny_grpo.yaml")


def test_grpo_advantages_by_hand():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = grpo_advantages(r, eps=0.0 + 1e-6)
    # group 0: mean 0.5, std 0.5 -> +-1; group 1: all equal -> 0
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(adv[1], [0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(grpo_advantages(r, normalize_std=False)[0], [0.5, -0.5, -0.5, 0.5])


def test_clipped_objective_by_hand():
    old = jnp.log(jnp.array([0.5, 0.5, 0.5, 0.5]))
    new = jnp.log(jnp.array([0.8, 0.8, 0.3, 0.3]))  # ratios 1.6, 1.6, 0.6, 0.6
    adv = jnp.array([1.0, -1.0, 1.0, -1.0])
    loss, clipped, ratio = clipped_policy_loss(new, old, adv, 0.2)
    np.testing.assert_allclose(ratio, [1.6, 1.6, 0.6, 0.6], rtol=1e-6)
    # -min(r A, clip(r) A): A>0,r=1.6 -> -1.2 (clipped); A<0,r=1.6 -> 1.6; A>0,r=0.6 -> -0.6; A<0,r=0.6 -> 0.8 (clipped)
    np.testing.assert_allclose(loss, [-1.2, 1.6, -0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [1, 0, 0, 1])
    vl = clipped_value_loss(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]), jnp.array([2.0, 0.0]), 0.2)
    # v=1 (clipped to 0.7): max((1-2)^2, (0.7-2)^2)/2 = 0.845; v=0 (clipped to 0.3): max(0, 0.09)/2 = 0.045
    np.testing.assert_allclose(vl, [0.845, 0.045], rtol=1e-6)
    np.testing.assert_allclose(k3_kl(jnp.log(0.5), jnp.log(0.25)), 0.5 - math.log(0.5) - 1, rtol=1e-6)


def test_gae_by_hand():
    # one row: prompt position 0, response positions 1..3; reward 1 at the end
    rewards = np.array([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = np.array([[9.0, 0.5, 0.6, 0.7, 9.0]])  # values outside the mask must not leak in
    mask = np.array([[0, 1, 1, 1, 0]], np.float32)
    g, lam = 0.9, 0.8
    d3 = 1.0 - 0.7
    d2 = 0.0 + g * 0.7 - 0.6
    d1 = 0.0 + g * 0.6 - 0.5
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    adv, ret = gae(rewards, values, mask, gamma=g, lam=lam)
    np.testing.assert_allclose(adv[0], [0, a1, a2, a3, 0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ret[0], [0, a1 + 0.5, a2 + 0.6, a3 + 0.7, 0], rtol=1e-6, atol=1e-7)


def test_verifiable_rewards():
    ref = Reference("37000 m")
    assert unit_conversion("37000 m<|im_end|>", ref) == 1.0
    assert unit_conversion("3700 m", ref) == 0.0 and unit_conversion("37000 km", ref) == 0.0
    assert math_answer("12 + 7 = 19", Reference("12 + 7 = 19")) == 1.0
    assert math_answer("12 + 7 = 18", Reference("12 + 7 = 19")) == 0.0
    call = {"function": {"name": "get_weather", "arguments": json.dumps({"city": "Lima"})}}
    good = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Lima"}}<|action_end|>'
    assert tool_call(good, Reference("", (call,))) == 1.0
    assert tool_call(good.replace("Lima", "Oslo"), Reference("", (call,))) == 0.0
    assert tool_call("It is sunny.", Reference("", (call,))) == 0.0


def _cfg(tmp_path, *extra):
    return load_config(RLConfig, TINY, [
        "init_from=null", f"output_dir={tmp_path / 'rl'}", "engine.warmup=false", "eval_items=8", "benchmark=false",
        "progress=false", "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_tokens=8", *extra])


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_sync_engine_logprobs_equal_trainer_forward(tmp_path):
    """After an update and a sync, the engine's greedy log-probs of its own sequence equal the trainer's forward of
    that sequence to 1e-5, and the engine holds the train state's buffers (no copy)."""
    tr = RLTrainer(_cfg(tmp_path, "optimizer.lr=1e-2"), devices=DEV)
    try:
        m = tr.step(1)  # generate -> score -> reference -> update -> sync
        assert m["sync_zero_copy"] == 1.0
        prompt = tr.prompts[0].ids
        out = tr.engine.generate([prompt], tr.sampling(0, greedy=True, max_tokens=8))[0].outputs[0]
        rows = rollout_rows([prompt], [out.token_ids], [out.logprobs], tr.cfg.seq_len)
        batch = {k: jnp.asarray(v) for k, v in rows.items()}
        lp, _, _ = jax.jit(token_stats, static_argnums=(2, 3))(tr.state["params"]["policy"], batch, tr.model, 0)
        mask = rows["loss_mask"] > 0
        trainer_lp = np.asarray(lp)[mask]
        np.testing.assert_allclose(np.asarray(out.logprobs), trainer_lp, atol=1e-5)
        # the initial params (the frozen reference) give other log-probs: the sync really changed the weights
        ref_lp, _, _ = jax.jit(token_stats, static_argnums=(2, 3))(tr.reference, batch, tr.model, 0)
        assert np.abs(np.asarray(ref_lp)[mask] - trainer_lp).max() > 1e-4
    finally:
        tr.engine.shutdown()


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_ppo_and_lora_runs(tmp_path):
    """PPO with a value head (GAE, two epochs x two minibatches) on a LoRA policy: finite metrics, the value loss
    is reported, adapters are saved, and the reference (base without adapters) gives a non-negative KL."""
    res = train_rl(_cfg(tmp_path, "algorithm=ppo", "mode=lora", "lora.rank=4", "steps=2", "optimizer.lr=1e-3"),
                   devices=DEV)
    for h in res.history:
        for k in ("kl", "entropy", "clip_frac", "value_loss", "reward_mean", "t_update"):
            assert np.isfinite(h[k]), (k, h)
        assert h["kl"] >= 0.0
    assert os.path.exists(os.path.join(res.summary["saved"], "adapter_config.json"))
    assert os.path.exists(os.path.join(res.output_dir, "reward_kl.png"))


@pytest.mark.slow
def test_grpo_from_sft_raises_held_out_exact_match(tmp_path):
    """A tiny model SFT-trained briefly on unit conversions, then GRPO with the verifiable unit-conversion reward;
    exact match on held-out numbers before and after is printed (no bound asserted on the noisy metric), the KL to
    the SFT reference stays bounded and the reward does not collapse."""
    from internlm_jax.train.finetune import FinetuneConfig, finetune

    sft = load_config(FinetuneConfig, os.path.join(ROOT, "configs", "finetune", "tiny_sft.yaml"), [
        f"output_dir={tmp_path / 'sft'}", "steps=120", "global_batch_size=16", "eval_every=0", "checkpoint_every=0",
        "progress=false", "tensorboard=false", "dataset.sources=[assets:sft/unit_conversion.jsonl]",
        "dataset.seq_len=256", "export.hf_dir=hf"])
    finetune(sft, devices=DEV)
    cfg = load_config(RLConfig, TINY, [
        f"init_from={tmp_path / 'sft' / 'hf'}", f"output_dir={tmp_path / 'rl'}", "steps=12", "eval_items=32",
        "engine.warmup=false", "benchmark=false", "progress=true"])
    res = train_rl(cfg, devices=DEV)
    print(f"held-out unit conversion exact match: before {res.eval_before:.3f}, after {res.eval_after:.3f}; "
          f"reward {res.summary['reward_first']:.3f} -> {res.summary['reward_last']:.3f}, "
          f"max KL {res.summary['kl_max']:.4f}")
    assert res.summary["kl_max"] < 0.5
    assert all(np.isfinite(h["policy_loss"]) for h in res.history)
    assert np.mean([h["reward_mean"] for h in res.history[-4:]]) >= 0.5 * res.history[0]["reward_mean"]
