"""Online RL in one process: rollouts on the Engine, rewards, a reference pass, updates on the sharded train step,
and a weight sync that hands the engine the very arrays the train step produced.

One step:
    generate   Engine.generate(prompts, SamplingParams(n, temperature, logprobs=0)): continuous batching over
               the paged KV cache; each sampled token comes with its log-prob (the sampling policy's)
    score      a verifiable Python reward of the decoded text, or a reward model's scalar (jitted forward)
    reference  one jitted call: the frozen reference's log-probs (LoRA: the same params with the adapters
               dropped, no second copy of the base), PPO's values, optionally the policy's own log-probs
    update     advantages (GRPO: group-relative; PPO: GAE), then epochs x minibatches of `train.step`'s
               sharded, donated train step with the clipped-ratio loss of `train.rl`
    sync       engine.update_params(new policy params): the arrays already live on the engine's devices with the
               engine's shardings (the engine was built with the trainer's mesh and param shardings), so nothing is
               copied or reloaded and the compiled decode steps are reused
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ConfigError
from internlm_jax.train.rl import grpo_advantages, gae, make_rl_loss, reference_pass, value_head_axes, \
    value_head_init
from internlm_jax.train.rl_config import RLConfig
from internlm_jax.train.rl_rewards import RLPrompt, exact_match, load_prompts, resolve_reward

BATCH = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "old_logp", "ref_logp", "advantages")


@dataclasses.dataclass
class RLResult:
    output_dir: str
    history: list[dict[str, float]]
    eval_before: float | None
    eval_after: float | None
    params: Any
    summary: dict[str, Any]


def rollout_rows(prompts: list[list[int]], responses: list[list[int]], logps: list[list[float]], seq_len: int,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
    """[B, seq_len] rows of prompt + response (one sample per row); the loss mask covers the response targets
    and old_logp holds the sampler's log-prob of each response token at its target position."""
    B = len(responses)
    out = {k: np.zeros((B, seq_len), np.float32 if k in ("loss_mask", "old_logp") else np.int32)
           for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask", "old_logp")}
    out["tokens"][:] = pad_id
    for b, (p, r, lp) in enumerate(zip(prompts, responses, logps)):
        seq = list(p) + list(r)
        n = len(seq) - 1
        if n > seq_len:
            raise ConfigError(f"a rollout of {len(seq)} tokens does not fit the update row of {seq_len}")
        out["tokens"][b, :n] = seq[:-1]
        out["targets"][b, :n] = seq[1:]
        out["positions"][b, :n] = np.arange(n)
        out["segment_ids"][b, :n] = 1
        s = len(p) - 1
        out["loss_mask"][b, s:s + len(r)] = 1.0
        out["old_logp"][b, s:s + len(r)] = lp
    return out


class RLTrainer:
    def __init__(self, cfg: RLConfig, *, devices: list[Any] | None = None):
        from internlm_jax.data.sft import load_chat_tokenizer
        from internlm_jax.engine import Engine, EngineConfig
        from internlm_jax.peft import is_adapter_path
        from internlm_jax.sharding import make_mesh
        from internlm_jax.train.finetune import finetune_axes
        from internlm_jax.train.optimizer import build_optimizer, trainable_mask
        from internlm_jax.train.reward import build_policy_params
        from internlm_jax.train.step import init_state, make_step_fns

        self.cfg = cfg
        self.model = model = cfg.model.build()
        folder = cfg.init_from if cfg.init_from and os.path.isdir(cfg.init_from) else None
        self.tok = load_chat_tokenizer(cfg.tokenizer, folder)
        ro = cfg.rollout
        self.prompts = load_prompts(cfg.prompts, self.tok, max_prompt_len=ro.max_prompt_len)
        self.eval_prompts = (load_prompts(cfg.eval_prompts, self.tok, max_prompt_len=ro.max_prompt_len,
                                          limit=cfg.eval_items) if cfg.eval_prompts else [])
        if len(self.prompts) < ro.prompts_per_step:
            raise ConfigError(f"{len(self.prompts)} prompts, fewer than rollout.prompts_per_step={ro.prompts_per_step}")
        self.mesh = mesh = make_mesh(cfg.mesh, devices)
        self.critic = cfg.algorithm == "ppo"
        policy = build_policy_params(model, cfg.init_from, cfg.mode, cfg.lora, cfg.seed, mesh)
        params = {"policy": policy}
        if self.critic:
            params["value"] = value_head_init(model)
        pred = None if cfg.mode == "full" else (lambda path, leaf: is_adapter_path(path) or path.startswith("['value']"))
        mask = trainable_mask(params, pred)
        rows = ro.prompts_per_step * ro.n
        updates = cfg.algo.epochs * cfg.algo.minibatches
        tx, schedule = build_optimizer(cfg.optimizer, cfg.steps * updates)
        abstract = jax.eval_shape(lambda p: init_state(p, tx, mask), params)
        axes = {"policy": finetune_axes(abstract["params"]["policy"], model)}
        if self.critic:
            axes["value"] = value_head_axes()
        a = cfg.algo
        loss = make_rl_loss(clip_eps=a.clip_eps, kl_coef=a.kl_coef, entropy_coef=a.entropy_coef, vf_coef=a.vf_coef,
                            value_clip=a.value_clip, critic=self.critic, chunk=cfg.loss_chunk)
        self.fns = make_step_fns(model, tx, schedule, mesh, abstract, axes, mask, loss_fn=loss)
        self.state = jax.device_put(init_state(params, tx, mask), self.fns.shardings)
        # Full fine-tune: a frozen copy of the initial policy. LoRA: None (the base under the adapters).
        self.reference = (jax.tree.map(jnp.copy, self.state["params"]["policy"]) if cfg.mode == "full" else None)
        self._ref_fn = jax.jit(functools.partial(self._reference, config=model, chunk=cfg.loss_chunk,
                                                 policy_logp=cfg.old_logprobs == "recompute"))
        self.reward_fn = resolve_reward(cfg.reward.function) if cfg.reward.function else None
        self.rm = None
        if cfg.reward.model:
            from internlm_jax.train.reward import load_reward_model, score

            rm_config, rm_params = load_reward_model(cfg.reward.model)
            self.rm = (rm_config, rm_params, jax.jit(score, static_argnums=3))
        ec = cfg.engine
        self.engine_config = EngineConfig(
            page_size=ec.page_size, max_num_seqs=ec.max_num_seqs or rows,
            max_num_batched_tokens=ec.max_num_batched_tokens or max(512, rows + 1),
            max_model_len=cfg.seq_len, kv_cache_tokens=(ec.max_num_seqs or rows) * (cfg.seq_len + ec.page_size),
            kv_dtype=ec.kv_dtype, warmup=ec.warmup, seed=cfg.seed)
        self._policy_shardings = self.fns.shardings["params"]["policy"]
        t0 = time.perf_counter()
        self.engine = Engine(self.state["params"]["policy"], model, self.engine_config, tokenizer=self.tok,
                             mesh=mesh, param_shardings=self._policy_shardings)
        self.engine_build_s = time.perf_counter() - t0
        self.rng = np.random.default_rng(cfg.seed)
        self.stop_ids = (int(self.tok.im_end_id),)

    # ---- pieces --------------------------------------------------------------------------------------------
    @staticmethod
    def _reference(policy, reference, value_head, batch, *, config, chunk, policy_logp):
        from internlm_jax.train.dpo import reference_params

        ref = reference if reference is not None else reference_params(policy)
        return reference_pass(policy, ref, value_head, batch, config, chunk, policy_logp=policy_logp)

    def sync(self) -> tuple[float, bool]:
        """Hand the engine the train state's policy params; (seconds, whether the engine now holds the very same
        device buffers, i.e. nothing was copied)."""
        policy = self.state["params"]["policy"]
        t0 = time.perf_counter()
        self.engine.update_params(policy)
        jax.block_until_ready(self.engine.runner.params)
        dt = time.perf_counter() - t0
        same = all(a is b or a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
                   for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(self.engine.runner.params))
                   if len(a.sharding.device_set) == 1)
        return dt, same

    def sampling(self, seed: int, *, greedy: bool = False, max_tokens: int | None = None) -> Any:
        from internlm_jax.sampling import SamplingParams

        ro = self.cfg.rollout
        if greedy:
            return SamplingParams(temperature=0.0, max_tokens=max_tokens or self.cfg.eval_max_tokens,
                                  stop_token_ids=self.stop_ids, logprobs=0)
        return SamplingParams(n=ro.n, temperature=ro.temperature, top_p=ro.top_p, max_tokens=ro.max_tokens,
                              stop_token_ids=self.stop_ids, logprobs=0, seed=seed)

    def rewards(self, items: list[RLPrompt], responses: list[list[int]], per: int) -> np.ndarray:
        if self.rm is not None:
            from internlm_jax.train.reward import score_sequences

            rm_config, rm_params, fn = self.rm
            seqs = [items[i // per].ids + r for i, r in enumerate(responses)]
            vals = score_sequences(rm_params, rm_config, seqs, pad_to=self.cfg.seq_len, fn=fn)
        else:
            vals = np.asarray([self.reward_fn(self.tok.decode(r), items[i // per].reference)
                               for i, r in enumerate(responses)], np.float32)
        return vals.astype(np.float32) * self.cfg.reward.scale

    def evaluate(self) -> float | None:
        """Greedy held-out score through the engine: the verifiable reward's mean (exact match with a reward
        model)."""
        if not self.eval_prompts:
            return None
        fn = self.reward_fn or exact_match
        outs = self.engine.generate([p.ids for p in self.eval_prompts], self.sampling(0, greedy=True))
        return float(np.mean([fn(self.tok.decode(o.outputs[0].token_ids), p.reference)
                              for o, p in zip(outs, self.eval_prompts)]))

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        cfg, ro, a = self.cfg, self.cfg.rollout, self.cfg.algo
        m: dict[str, float] = {"step": step}
        idx = self.rng.choice(len(self.prompts), ro.prompts_per_step, replace=False)
        items = [self.prompts[i] for i in idx]
        seed = int(self.rng.integers(0, 2**31 - 1))

        t0 = time.perf_counter()
        outs = self.engine.generate([p.ids for p in items], self.sampling(seed))
        t_gen = time.perf_counter() - t0
        responses = [o.token_ids for out in outs for o in out.outputs]
        logps = [o.logprobs for out in outs for o in out.outputs]
        gen_tokens = sum(len(r) for r in responses)

        t0 = time.perf_counter()
        rewards = self.rewards(items, responses, ro.n)
        t_score = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = rollout_rows([items[i // ro.n].ids for i in range(len(responses))], responses, logps, cfg.seq_len,
                            int(self.tok.pad_id))
        dev = {k: jax.device_put(v, self.fns.batch_sharding) for k, v in rows.items()}
        policy = self.state["params"]["policy"]
        ref = jax.device_get(self._ref_fn(policy, self.reference, self.state["params"].get("value"), dev))
        t_ref = time.perf_counter() - t0

        t0 = time.perf_counter()
        mask = rows["loss_mask"]
        if cfg.old_logprobs == "recompute":
            m["engine_logp_err"] = float(np.abs(ref["logp"] - rows["old_logp"])[mask > 0].max(initial=0.0))
            rows["old_logp"] = ref["logp"] * mask
        rows["ref_logp"] = ref["ref_logp"] * mask
        if self.critic:
            tok_r = -a.kl_reward_coef * (rows["old_logp"] - rows["ref_logp"]) * mask
            last = np.asarray([np.flatnonzero(r)[-1] for r in mask])
            tok_r[np.arange(len(last)), last] += rewards
            values = ref["values"] * mask
            adv, ret = gae(tok_r, values, mask, gamma=a.gamma, lam=a.lam)
            if a.whiten_advantages:
                sel = adv[mask > 0]
                adv = (adv - sel.mean()) / (sel.std() + 1e-8) * mask
            rows.update(advantages=adv.astype(np.float32), returns=ret, old_values=values.astype(np.float32))
        else:
            adv = grpo_advantages(rewards.reshape(ro.prompts_per_step, ro.n), normalize_std=a.normalize_std)
            rows["advantages"] = (adv.reshape(-1, 1) * mask).astype(np.float32)
        B = len(responses)
        mb = B // a.minibatches
        sums: dict[str, float] = {}
        n_up = 0
        for epoch in range(a.epochs):
            perm = self.rng.permutation(B) if a.epochs * a.minibatches > 1 else np.arange(B)
            for j in range(a.minibatches):
                take = perm[j * mb:(j + 1) * mb]
                batch = {k: jax.device_put(v[take], self.fns.batch_sharding) for k, v in rows.items()}
                self.state, metrics = self.fns.train(self.state, batch)
                for k, v in jax.device_get(metrics).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n_up += 1
        jax.block_until_ready(self.state)
        t_up = time.perf_counter() - t0
        sync_s, zero_copy = self.sync()

        m.update({k: v / n_up for k, v in sums.items() if k not in ("z_loss", "tokens")})
        m["policy_loss"] = m.pop("loss")
        lens = np.asarray([len(r) for r in responses])
        m.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                 response_len=float(lens.mean()), rollout_tokens=float(gen_tokens),
                 rollout_tok_s=gen_tokens / max(t_gen, 1e-9),
                 train_tok_s=a.epochs * float(rows["segment_ids"].astype(bool).sum()) / max(t_up, 1e-9),
                 t_generate=t_gen, t_score=t_score, t_reference=t_ref, t_update=t_up, t_sync=sync_s,
                 sync_zero_copy=float(zero_copy))
        return m

    # ---- the run -------------------------------------------------------------------------------------------
    def run(self) -> RLResult:
        cfg = self.cfg
        out = os.path.abspath(cfg.output_dir)
        os.makedirs(out, exist_ok=True)
        from internlm_jax.runconfig import dump_yaml

        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))
        before = self.evaluate()
        if before is not None:
            print(f"held-out score before RL: {before:.3f} ({len(self.eval_prompts)} prompts, greedy)")
        history: list[dict[str, float]] = []
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            for step in range(1, cfg.steps + 1):
                m = self.step(step)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    m["eval_score"] = self.evaluate()
                history.append(m)
                f.write(json.dumps(m) + "\n")
                f.flush()
                if cfg.progress:
                    print(f"step {step}: reward {m['reward_mean']:.3f}±{m['reward_std']:.3f} kl {m['kl']:.4f} "
                          f"entropy {m['entropy']:.3f} clip {m['clip_frac']:.3f} len {m['response_len']:.1f} "
                          f"rollout {m['rollout_tok_s']:.0f} tok/s train {m['train_tok_s']:.0f} tok/s | gen "
                          f"{m['t_generate']:.2f}s score {m['t_score']:.3f}s ref {m['t_reference']:.2f}s upd "
                          f"{m['t_update']:.2f}s sync {1e3 * m['t_sync']:.2f}ms", flush=True)
        after = self.evaluate()
        if after is not None:
            history[-1]["eval_score"] = after
            print(f"held-out score after RL: {after:.3f} (before {before:.3f})")
        summary = summarize(history, before, after)
        if cfg.benchmark:
            summary["benchmark"] = self.benchmark(history)
        if cfg.save:
            summary["saved"] = self.save(out)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        try:
            plot_rl(history, os.path.join(out, "reward_kl.png"))
        except Exception as e:  # noqa: BLE001 - a plot never fails a finished run
            print(f"warning: could not draw the reward/KL plot: {e}", file=sys.stderr)
        print(json.dumps(summary, indent=2))
        return RLResult(out, history, before, after, self.state["params"], summary)

    def benchmark(self, history: list[dict[str, float]]) -> dict[str, float]:
        """Rollout tok/s inside RL (steps after the first, whose compiles are excluded) against a standalone
        Engine (same params, same EngineConfig, warmed up) generating the same number of prompts x samples."""
        from internlm_jax.engine import Engine

        steady = [h["rollout_tok_s"] for h in history[1:]] or [history[0]["rollout_tok_s"]]
        items = [self.prompts[i] for i in self.rng.choice(len(self.prompts), self.cfg.rollout.prompts_per_step,
                                                          replace=False)]
        alone = Engine(self.state["params"]["policy"], self.model, self.engine_config, tokenizer=self.tok,
                       mesh=self.mesh, param_shardings=self._policy_shardings)
        speeds = []
        for rep in range(3):
            t0 = time.perf_counter()
            outs = alone.generate([p.ids for p in items], self.sampling(1000 + rep))
            n = sum(len(o.token_ids) for out in outs for o in out.outputs)
            speeds.append(n / (time.perf_counter() - t0))
        alone.shutdown()
        inside = float(np.median(steady))
        engine_alone = float(np.median(speeds[1:]))
        return {"rollout_tok_s_in_rl": inside, "rollout_tok_s_engine_alone": engine_alone,
                "ratio": inside / engine_alone}

    def save(self, out: str) -> str:
        policy = self.state["params"]["policy"]
        if self.cfg.mode == "lora":
            from internlm_jax.peft import save_adapters

            path = os.path.join(out, "adapter")
            save_adapters(path, policy, self.model, format="peft", overwrite=True,
                          base_model_name_or_path=os.path.abspath(self.cfg.init_from) if self.cfg.init_from else None)
        else:
            from internlm_jax.checkpoint.orbax_io import save_params

            path = os.path.join(out, "policy")
            save_params(path, policy, self.model, {"kind": "rl_policy", "algorithm": self.cfg.algorithm},
                        overwrite=True)
        return path


def summarize(history: list[dict[str, float]], before: float | None, after: float | None) -> dict[str, Any]:
    keys = ("t_generate", "t_score", "t_reference", "t_update", "t_sync")
    steady = history[1:] or history
    return {
        "steps": len(history), "eval_before": before, "eval_after": after,
        "reward_first": history[0]["reward_mean"], "reward_last": history[-1]["reward_mean"],
        "kl_max": max(h["kl"] for h in history),
        "seconds_per_step": {k[2:]: float(np.mean([h[k] for h in steady])) for k in keys},
        "sync_ms": {"mean": 1e3 * float(np.mean([h["t_sync"] for h in history])),
                    "max": 1e3 * float(max(h["t_sync"] for h in history))},
        "sync_zero_copy": all(h["sync_zero_copy"] > 0 for h in history),
        "rollout_tok_s": float(np.mean([h["rollout_tok_s"] for h in steady])),
        "train_tok_s": float(np.mean([h["train_tok_s"] for h in steady])),
    }


def plot_rl(history: list[dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    mean = np.asarray([h["reward_mean"] for h in history])
    std = np.asarray([h["reward_std"] for h in history])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, mean, label="reward mean")
    ax1.fill_between(steps, mean - std, mean + std, alpha=0.2, label="± std")
    ev = [(h["step"], h["eval_score"]) for h in history if h.get("eval_score") is not None]
    if ev:
        ax1.plot(*zip(*ev), "o-", label="held-out (greedy)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("reward")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [h["kl"] for h in history], color="tab:red")
    ax2.set_xlabel("step")
    ax2.set_ylabel("KL to reference (k3, per token)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_rl(cfg: RLConfig, *, devices: list[Any] | None = None) -> RLResult:
    trainer = RLTrainer(cfg, devices=devices)
    try:
        return trainer.run()
    finally:
        trainer.engine.shutdown()
