"""Reward model: the InternLM2 backbone (full or LoRA) with a scalar head on the last token's final-norm hidden
state, trained on preference pairs with the Bradley-Terry loss, saved as an ordinary params checkpoint.

    params = {"backbone": model params (LoRA-wrapped in lora mode), "head": {"w": [D], "b": []}}
    r(x)   = w . norm(h_last(x)) + b
    loss   = -log sigmoid(r(prompt + chosen) - r(prompt + rejected)), averaged over pairs

A row of a training batch holds one pair packed as two segments (chosen = segment 1, rejected = segment 2;
positions restart per segment), so the pair shares one row of the sharded train step (`train.step`); the rows'
`pair_sign` is +1 at the chosen sequence's last token, -1 at the rejected one's. A sequence to score is the
prompt with the generation prompt, then the completion, ending at its <|im_end|>, exactly what a rollout of the
engine produces, so the same model scores RL samples.

Saved folder (internlm_jax.checkpoint.orbax_io layout): params/ (the backbone, LoRA merged), model_config.json,
and extra.json with {"kind": "reward_model", "head": {"w": [...], "b": ...}}; `load_reward_model` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.model import forward
from internlm_jax.train.rl import apply_value_head, value_head_axes, value_head_init
from internlm_jax.train.rl_config import RewardTrainConfig

KIND = "reward_model"


# ---- data ---------------------------------------------------------------------------------------------------
def completion_ids(tokenizer: Any, prompt: list[dict], completion: list[dict], tools: Any = None) -> list[int]:
    """prompt (with the generation prompt) + completion, cut right after the completion's last <|im_end|>."""
    from internlm_jax.chat import encode_chat

    full = encode_chat(tokenizer, prompt + completion, tools=tools, add_generation_prompt=False)
    end = tokenizer.im_end_id
    cut = max(i for i, t in enumerate(full) if t == end) + 1 if end in full else len(full)
    return list(full[:cut])


def load_pairs(sources: Sequence[str], tokenizer: Any, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) of each pair record; a pair that does not fit one row is an error."""
    from internlm_jax.data.dpo import split_prompt
    from internlm_jax.data.sft import iter_records

    pairs = []
    for src in sources:
        for where, obj, err in iter_records(src):
            if err is not None:
                raise err
            prompt, chosen, rejected = split_prompt(obj, where)
            c = completion_ids(tokenizer, prompt, chosen, obj.get("tools"))
            r = completion_ids(tokenizer, prompt, rejected, obj.get("tools"))
            if len(c) + len(r) > seq_len:
                raise ConfigError(f"{where}: chosen + rejected take {len(c) + len(r)} tokens, above seq_len={seq_len}")
            pairs.append((c, r))
    if not pairs:
        raise ConfigError(f"no preference pairs in {list(sources)}")
    return pairs


def pair_rows(pairs: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One row per pair: chosen then rejected as two packed segments; [B, seq_len] arrays."""
    B = len(pairs)
    out = {"tokens": np.full((B, seq_len), pad_id, np.int32), "targets": np.zeros((B, seq_len), np.int32),
           "positions": np.zeros((B, seq_len), np.int32), "segment_ids": np.zeros((B, seq_len), np.int32),
           "loss_mask": np.zeros((B, seq_len), np.float32), "pair_sign": np.zeros((B, seq_len), np.float32)}
    for b, (c, r) in enumerate(pairs):
        t = 0
        for seg, (ids, sign) in enumerate(((c, 1.0), (r, -1.0)), start=1):
            n = len(ids)
            out["tokens"][b, t:t + n] = ids
            out["positions"][b, t:t + n] = np.arange(n)
            out["segment_ids"][b, t:t + n] = seg
            out["loss_mask"][b, t + n - 1] = 1.0
            out["pair_sign"][b, t + n - 1] = sign
            t += n
    return out


# ---- the model ----------------------------------------------------------------------------------------------
def token_rewards(params: Any, batch: dict[str, jax.Array], config: ModelConfig) -> jax.Array:
    """The head's scalar at every position [B, T] (one forward over packed rows)."""
    hidden, _ = forward(params["backbone"], batch["tokens"], batch["positions"], config=config,
                        segment_ids=batch["segment_ids"], return_hidden=True)
    return apply_value_head(params["head"], hidden)


def bt_loss(params: Any, batch: dict[str, jax.Array], config: ModelConfig
            ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry: (sum over pairs of -log sigmoid(r_c - r_r), number of pairs, aux sums)."""
    r = token_rewards(params, batch, config)
    sign = batch["pair_sign"]
    rc = jnp.sum(r * (sign > 0), axis=1)
    rr = jnp.sum(r * (sign < 0), axis=1)
    valid = (jnp.any(sign > 0, axis=1) & jnp.any(sign < 0, axis=1)).astype(jnp.float32)
    losses = -jax.nn.log_sigmoid(rc - rr)
    total = jnp.sum(losses * valid)
    return total, jnp.sum(valid), {"ce_sum": total, "z_sum": jnp.zeros((), jnp.float32),
                                   "accuracy": jnp.sum((rc > rr) * valid), "margin": jnp.sum((rc - rr) * valid),
                                   "chosen": jnp.sum(rc * valid), "rejected": jnp.sum(rr * valid)}


def score(params: Any, tokens: jax.Array, lengths: jax.Array, config: ModelConfig) -> jax.Array:
    """[B] rewards of right-padded sequences [B, T] with true `lengths` (the head reads each last token)."""
    B, T = tokens.shape
    positions = jnp.where(jnp.arange(T)[None] < lengths[:, None], jnp.arange(T)[None], -1)
    segs = (positions >= 0).astype(jnp.int32)
    hidden, _ = forward(params["backbone"], tokens, jnp.maximum(positions, 0), config=config, segment_ids=segs,
                        logits_index=lengths - 1, return_hidden=True)
    return apply_value_head(params["head"], hidden)


def score_sequences(params: Any, config: ModelConfig, seqs: Sequence[Sequence[int]], *, pad_to: int = 16,
                    fn: Any = None) -> np.ndarray:
    """Host helper: scores of token lists (padded to a multiple of pad_to so shapes repeat)."""
    T = -(-max(len(s) for s in seqs) // pad_to) * pad_to
    toks = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = s
    lengths = np.asarray([len(s) for s in seqs], np.int32)
    fn = fn or jax.jit(score, static_argnums=3)
    return np.asarray(fn(params, jnp.asarray(toks), jnp.asarray(lengths), config))


def reward_axes(abstract_backbone: Any, model: ModelConfig) -> dict[str, Any]:
    from internlm_jax.train.finetune import finetune_axes

    return {"backbone": finetune_axes(abstract_backbone, model), "head": value_head_axes()}


# ---- save / load --------------------------------------------------------------------------------------------
def save_reward_model(path: str, params: Any, config: ModelConfig, *, overwrite: bool = True) -> str:
    from internlm_jax.checkpoint.orbax_io import save_params
    from internlm_jax.peft import merge_lora

    head = jax.device_get(params["head"])
    extra = {"kind": KIND, "head": {"w": [float(x) for x in np.asarray(head["w"]).ravel()],
                                    "b": float(np.asarray(head["b"]))}}
    save_params(path, merge_lora(params["backbone"]), config, extra, overwrite=overwrite)
    return os.path.abspath(path)


def load_reward_model(path: str, mesh: Any = None) -> tuple[ModelConfig, Any]:
    from internlm_jax.checkpoint.orbax_io import read_extra, restore_params

    if not os.path.isdir(path):
        raise ConfigError(f"reward model {path!r} is not a folder (write one with `internlm-jax reward train`)")
    extra = read_extra(path)
    if extra.get("kind") != KIND:
        raise ConfigError(f"{path} is not a reward model (its extra.json has no kind: {KIND}); train one with "
                          "`internlm-jax reward train --config ...`")
    config, backbone = restore_params(path, mesh=mesh)
    head = {"w": jnp.asarray(extra["head"]["w"], jnp.float32), "b": jnp.asarray(extra["head"]["b"], jnp.float32)}
    return config, {"backbone": backbone, "head": head}


# ---- training -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RewardResult:
    params: Any
    model: ModelConfig
    history: list[dict[str, float]]
    before: dict[str, float]
    after: dict[str, float]
    path: str | None


def evaluate_pairs(params: Any, config: ModelConfig, pairs: Sequence[tuple[list[int], list[int]]], seq_len: int,
                   batch: int = 16) -> dict[str, float]:
    """Mean BT loss and pair accuracy over all pairs (default device)."""
    fn = jax.jit(bt_loss, static_argnums=2)
    tot: dict[str, float] = {}
    n = 0.0
    for i in range(0, len(pairs), batch):
        rows = pair_rows(pairs[i:i + batch], seq_len)
        numer, denom, aux = jax.device_get(fn(params, {k: jnp.asarray(v) for k, v in rows.items()}, config))
        n += float(denom)
        for k, v in aux.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    return {"loss": tot["ce_sum"] / n, "accuracy": tot["accuracy"] / n, "margin": tot["margin"] / n, "pairs": n}


def build_policy_params(model: ModelConfig, init_from: str | None, mode: str, lora: Any, seed: int, mesh: Any
                        ) -> Any:
    """Dense weights from init_from (HF folder / params checkpoint / run; None: random from seed) placed by their
    logical axes on `mesh`, LoRA-wrapped in lora mode (adapters drawn from seed; B = 0, so outputs are unchanged)."""
    from internlm_jax.model import init_params, param_axes, param_shapes
    from internlm_jax.peft import apply_lora
    from internlm_jax.sharding import tree_shardings
    from internlm_jax.train.loop import load_initial_params

    key = jax.random.key(seed)
    shapes = param_shapes(model)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    sh = tree_shardings(mesh, param_axes(model), shapes)
    if init_from:
        target = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s, jnp.dtype(model.param_dtype), sharding=h),
                              shapes, sh, is_leaf=is_shape)
        dense = load_initial_params(init_from, model, target, mesh)
    else:
        dense = jax.jit(init_params, static_argnums=0, out_shardings=sh)(model, jax.random.fold_in(key, 0))
    if mode == "lora":
        dense = apply_lora(dense, model, targets=lora.targets, rank=lora.rank, alpha=lora.alpha,
                           key=jax.random.fold_in(key, 1), dtype=jnp.dtype(lora.dtype))
    return dense


def train_reward_model(cfg: RewardTrainConfig, *, devices: list[Any] | None = None, save: bool = True
                       ) -> RewardResult:
    from internlm_jax.data.sft import load_chat_tokenizer
    from internlm_jax.peft import is_adapter_path
    from internlm_jax.sharding import make_mesh
    from internlm_jax.train.optimizer import build_optimizer, trainable_mask
    from internlm_jax.train.step import init_state, make_step_fns

    model = cfg.model.build()
    tok = load_chat_tokenizer(cfg.tokenizer, cfg.init_from if cfg.init_from and os.path.isdir(cfg.init_from) else None)
    pairs = load_pairs(cfg.pairs, tok, cfg.seq_len)
    eval_pairs = load_pairs(cfg.eval_pairs, tok, cfg.seq_len) if cfg.eval_pairs else pairs
    mesh = make_mesh(cfg.mesh, devices)
    backbone = build_policy_params(model, cfg.init_from, cfg.mode, cfg.lora, cfg.seed, mesh)
    params = {"backbone": backbone, "head": value_head_init(model)}
    pred = None if cfg.mode == "full" else (lambda path, leaf: is_adapter_path(path) or path.startswith("['head']"))
    mask = trainable_mask(params, pred)
    tx, schedule = build_optimizer(cfg.optimizer, cfg.steps)
    abstract = jax.eval_shape(lambda p: init_state(p, tx, mask), params)
    axes = reward_axes(abstract["params"]["backbone"], model)
    fns = make_step_fns(model, tx, schedule, mesh, abstract, axes, mask, loss_fn=bt_loss)
    state = jax.device_put(init_state(params, tx, mask), fns.shardings)
    before = evaluate_pairs(state["params"], model, eval_pairs, cfg.seq_len)
    print(f"reward model: {len(pairs)} pairs; before training: loss {before['loss']:.4f}, "
          f"accuracy {before['accuracy']:.3f}")
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    history = []
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        while len(order) < cfg.global_batch_size:
            order += list(rng.permutation(len(pairs)))
        take, order = order[:cfg.global_batch_size], order[cfg.global_batch_size:]
        rows = pair_rows([pairs[i] for i in take], cfg.seq_len, int(tok.pad_id))
        batch = {k: jax.device_put(v, fns.batch_sharding) for k, v in rows.items()}
        state, metrics = fns.train(state, batch)
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m["step"] = step
        history.append(m)
        if cfg.progress and (step % max(1, cfg.steps // 10) == 0 or step == cfg.steps):
            print(f"step {step}: loss {m['loss']:.4f} accuracy {m['accuracy']:.3f} margin {m['margin']:.3f}")
    after = evaluate_pairs(state["params"], model, eval_pairs, cfg.seq_len)
    print(f"after {cfg.steps} steps ({time.perf_counter() - t0:.1f} s): loss {after['loss']:.4f}, "
          f"accuracy {after['accuracy']:.3f}")
    path = None
    if save:
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = save_reward_model(os.path.join(cfg.output_dir, KIND), state["params"], model)
        with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        print(f"reward model saved to {path}")
    return RewardResult(state["params"], model, history, before, after, path)


# ---- scoring jsonl ------------------------------------------------------------------------------------------
def score_jsonl(model_dir: str, input_path: str, output_path: str | None, tokenizer: str | None = None,
                batch: int = 16) -> list[dict[str, Any]]:
    """Score records: {"prompt", "response"} (string or messages), {"messages"} (up to the last assistant turn)
    or pairs {"prompt", "chosen", "rejected"} (adds chosen_score / rejected_score). Writes jsonl when asked."""
    from internlm_jax.data.dpo import split_prompt
    from internlm_jax.data.sft import iter_records, load_chat_tokenizer

    config, params = load_reward_model(model_dir)
    tok = load_chat_tokenizer(tokenizer or None, model_dir)
    fn = jax.jit(score, static_argnums=3)
    records, seqs, slots = [], [], []
    for where, obj, err in iter_records(input_path):
        if err is not None:
            raise err
        records.append(obj)
        if "chosen" in obj:
            prompt, c, r = split_prompt(obj, where)
            for side, comp in (("chosen_score", c), ("rejected_score", r)):
                seqs.append(completion_ids(tok, prompt, comp, obj.get("tools")))
                slots.append((len(records) - 1, side))
        elif "response" in obj:
            prompt = obj["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            resp = obj["response"]
            resp = [{"role": "assistant", "content": resp}] if isinstance(resp, str) else resp
            seqs.append(completion_ids(tok, prompt, resp, obj.get("tools")))
            slots.append((len(records) - 1, "score"))
        elif "messages" in obj:
            msgs = obj["messages"]
            k = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            seqs.append(completion_ids(tok, msgs[:k], msgs[k:k + 1], obj.get("tools")))
            slots.append((len(records) - 1, "score"))
        else:
            raise ConfigError(f"{where}: a record to score needs prompt+response, messages, or prompt+chosen+rejected")
    for i in range(0, len(seqs), batch):
        vals = score_sequences(params, config, seqs[i:i + batch], fn=fn)
        for (r, key), v in zip(slots[i:i + batch], vals):
            records[r][key] = float(v)
    if output_path:
        with open(output_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return records


def main(argv: list[str] | None = None) -> int:
    """`internlm-jax reward train --config ...` | `internlm-jax reward score --model DIR --input x.jsonl`."""
    import argparse

    from internlm_jax.runconfig import dump_yaml, load_config

    p = argparse.ArgumentParser(prog="internlm-jax reward", description="Reward models: train (Bradley-Terry on "
                                "preference pairs) and score jsonl records.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a reward model from a YAML config")
    t.add_argument("--config", default=None, help="YAML (RewardTrainConfig); omitted: the defaults")
    t.add_argument("--print-config", action="store_true")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    s = sub.add_parser("score", help="score jsonl records with a trained reward model")
    s.add_argument("--model", required=True, help="a folder written by `reward train`")
    s.add_argument("--input", required=True)
    s.add_argument("--output", default=None, help="jsonl with scores added (default: print)")
    s.add_argument("--tokenizer", default=None, help="`byte` or a tokenizer folder (default: the model's folder)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "train":
            cfg = load_config(RewardTrainConfig, args.config, args.overrides)
            if args.print_config:
                print(dump_yaml(cfg), end="")
                return 0
            train_reward_model(cfg)
        else:
            recs = score_jsonl(args.model, args.input, args.output, args.tokenizer)
            if not args.output:
                for r in recs:
                    print(json.dumps({k: v for k, v in r.items() if k.endswith("score")}))
    except ConfigError as e:
        print(f"internlm-jax reward: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if type(e).__name__ not in ("DataError", "TokenizerError"):
            raise
        print(f"internlm-jax reward: {e}", file=sys.stderr)
        return 2
    return 0
