"""AOT plan of the RL update step for a TPU topology (`internlm-jax rl --config ... --plan --topology ...`):
the same `make_step_fns` step with the RL loss, lowered with abstract (ShapeDtypeStruct) state over a mesh of the
topology's devices and compiled; the memory analysis says whether policy + optimizer state (+ value head) and
one minibatch of rollouts fit in HBM. The rollout engine's decode step and the reference pass are not planned
here (they hold no optimizer state; the engine reuses the policy's arrays)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from internlm_jax.train.rl_config import RLConfig


def plan_update(cfg: RLConfig, devices: list[Any]) -> dict[str, Any]:
    from internlm_jax.kernels import aot_target
    from internlm_jax.model import init_params
    from internlm_jax.peft import apply_lora, is_adapter_path
    from internlm_jax.sharding import make_mesh
    from internlm_jax.train.finetune import finetune_axes
    from internlm_jax.train.optimizer import build_optimizer, trainable_mask
    from internlm_jax.train.plan import HBM_BYTES
    from internlm_jax.train.rl import PPO_KEYS, make_rl_loss, value_head_axes, value_head_init
    from internlm_jax.train.rl_loop import BATCH
    from internlm_jax.train.step import init_state, make_step_fns

    model = cfg.model.build()
    mesh = make_mesh(cfg.mesh, devices)
    critic = cfg.algorithm == "ppo"
    lo = cfg.lora

    def build(key):
        p = init_params(model, key)
        if cfg.mode == "lora":
            p = apply_lora(p, model, targets=lo.targets, rank=lo.rank, alpha=lo.alpha, key=key, dtype=jnp.dtype(lo.dtype))
        out = {"policy": p}
        if critic:
            out["value"] = value_head_init(model)
        return out

    shapes = jax.eval_shape(build, jax.random.key(0))
    pred = None if cfg.mode == "full" else (lambda path, leaf: is_adapter_path(path) or path.startswith("['value']"))
    mask = trainable_mask(shapes, pred)
    a = cfg.algo
    tx, schedule = build_optimizer(cfg.optimizer, cfg.steps * a.epochs * a.minibatches)
    state = jax.eval_shape(lambda p: init_state(p, tx, mask), shapes)
    axes = {"policy": finetune_axes(shapes["policy"], model)}
    if critic:
        axes["value"] = value_head_axes()
    loss = make_rl_loss(clip_eps=a.clip_eps, kl_coef=a.kl_coef, entropy_coef=a.entropy_coef, vf_coef=a.vf_coef,
                        value_clip=a.value_clip, critic=critic, chunk=cfg.loss_chunk)
    fns = make_step_fns(model, tx, schedule, mesh, state, axes, mask, loss_fn=loss)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, fns.shardings)
    rows = cfg.rollout.prompts_per_step * cfg.rollout.n // a.minibatches
    keys = BATCH + (PPO_KEYS if critic else ())
    floats = ("loss_mask", "old_logp", "ref_logp", "advantages") + PPO_KEYS
    batch = {k: jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.float32 if k in floats else jnp.int32,
                                     sharding=fns.batch_sharding) for k in keys}
    t0 = time.perf_counter()
    with aot_target("tpu"):
        compiled = fns.train.lower(abstract, batch).compile()
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    hbm = HBM_BYTES.get(devices[0].device_kind)
    return {"what": f"rl update step ({cfg.algorithm}, {cfg.mode})", "devices": len(devices),
            "device_kind": devices[0].device_kind, "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "params": model.num_params(), "rows": rows, "seq_len": cfg.seq_len, "remat": model.remat,
            "bytes_per_device": int(per_device), "hbm_bytes_per_device": hbm,
            "fits": None if hbm is None else bool(per_device <= 0.95 * hbm),
            "compile_seconds": round(time.perf_counter() - t0, 1)}
