"""Online RL math on the one model path: per-token log-probs / entropy / values from one forward, GRPO's
group-relative advantages, PPO's GAE, and the clipped policy (+ value) loss that the sharded train step runs.

Batch of an RL update (every array [B, T], one sampled sequence per row: prompt + response, then padding):

    tokens, targets, positions, segment_ids   as in every training batch (segment 0 = padding)
    loss_mask    1 where the target is a response token (the prompt and padding are never trained)
    old_logp     log-prob of each response token under the policy that sampled it (the engine's, or recomputed)
    ref_logp     the frozen reference's log-probs (the base without adapters in LoRA mode)
    advantages   GRPO: the row's group-relative advantage on every response token; PPO: GAE per token
    returns, old_values   PPO only (the critic's targets and the values it had at rollout)

Per response token, with r = exp(logp - old_logp):
    pg   = -min(r A, clip(r, 1 - eps, 1 + eps) A)
    kl   = exp(ref - logp) - (ref - logp) - 1          (k3, unbiased and >= 0; Schulman's estimator)
    loss = pg + kl_coef kl - entropy_coef H  [+ vf_coef 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2)]
summed over the loss mask and divided by its count (the train step's numerator / denominator contract), so
gradient accumulation is exact. PPO puts the KL in the per-token reward instead (kl_coef in the loss is 0 there
by default), as InstructGPT / OpenRLHF do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.model import forward, head

RL_KEYS = ("old_logp", "ref_logp", "advantages")
PPO_KEYS = ("returns", "old_values")


# ---- one forward: log-probs, entropy, hidden -------------------------------------------------------------
def token_stats(params: Any, batch: dict[str, jax.Array], config: ModelConfig, chunk: int = 0
                ) -> tuple[Float[Array, "B T"], Float[Array, "B T"], Float[Array, "B T D"]]:
    """(log p(target), entropy of the next-token distribution, final-norm hidden) at every position, fp32.

    One `forward(..., return_hidden=True)`; the output head runs `chunk` positions at a time inside a
    rematerialised scan (chunk <= 0: all at once), so only [B, chunk, V] logits ever exist. The hidden states
    are returned for a value head on the same forward."""
    hidden, _ = forward(params, batch["tokens"], batch["positions"], config=config,
                        segment_ids=batch["segment_ids"], return_hidden=True)
    B, T, D = hidden.shape
    c = T if chunk <= 0 or chunk >= T else chunk
    if T % c:
        raise ConfigError(f"loss_chunk {chunk} must divide the row length {T}")
    n = T // c
    h = hidden.reshape(B, n, c, D).swapaxes(0, 1)
    tg = batch["targets"].reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def piece(_, xs):
        hc, tc = xs
        logits = head(params, hc, config)  # [B, c, V] fp32
        lse = jax.nn.logsumexp(logits, axis=-1)
        safe = jnp.clip(tc, 0, logits.shape[-1] - 1).astype(jnp.int32)
        lp = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0] - lse
        probs = jax.nn.softmax(logits, axis=-1)
        ent = lse - jnp.sum(probs * logits, axis=-1)
        return None, (lp, ent)

    _, (lp, ent) = jax.lax.scan(piece, None, (h, tg))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, T)  # noqa: E731
    return unchunk(lp), unchunk(ent), hidden


def value_head_init(config: ModelConfig) -> dict[str, jax.Array]:
    """A zero-initialised scalar head on the final-norm hidden state (critic / reward model)."""
    return {"w": jnp.zeros((config.hidden_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def value_head_axes() -> dict[str, tuple[str | None, ...]]:
    return {"w": ("norm",), "b": ()}


def apply_value_head(vh: dict[str, jax.Array], hidden: Float[Array, "... D"]) -> Float[Array, "..."]:
    return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), vh["w"]) + vh["b"]


# ---- advantages ------------------------------------------------------------------------------------------
def grpo_advantages(rewards: Float[Array, "P N"] | np.ndarray, *, normalize_std: bool = True, eps: float = 1e-6
                    ) -> np.ndarray:
    """Group-relative advantages: each prompt's N samples against their own mean (and std, unbiased=False)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [prompts, samples], got shape {r.shape}")
    adv = r - r.mean(axis=1, keepdims=True)
    if normalize_std:
        adv = adv / (r.std(axis=1, keepdims=True) + eps)
    return adv.astype(np.float32)


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over [B, T] rows whose `mask` marks each row's (contiguous) response.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last response token is 0),
    A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t. Zero outside the mask."""
    r, v, m = (np.asarray(x, np.float64) for x in (rewards, values, mask))
    B, T = r.shape
    adv = np.zeros((B, T))
    next_v = np.zeros(B)
    next_a = np.zeros(B)
    for t in range(T - 1, -1, -1):
        live = m[:, t] > 0
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_a
        adv[:, t] = np.where(live, a, 0.0)
        next_v = np.where(live, v[:, t], 0.0)
        next_a = np.where(live, a, 0.0)
    ret = (adv + v) * m
    return adv.astype(np.float32), ret.astype(np.float32)


def clipped_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip_eps: float
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per token: (PPO clipped surrogate loss, whether the clip was active, ratio)."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -jnp.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).astype(jnp.float32), ratio


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """exp(ref - logp) - (ref - logp) - 1: a non-negative per-token estimate of KL(policy || reference)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, clip: float) -> jax.Array:
    vc = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * jnp.maximum((values - returns) ** 2, (vc - returns) ** 2)


def rl_loss(params: Any, batch: dict[str, jax.Array], config: ModelConfig, *, clip_eps: float, kl_coef: float,
            entropy_coef: float = 0.0, vf_coef: float = 0.0, value_clip: float = 0.2, critic: bool = False,
            chunk: int = 0) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The train-step loss (numerator, denominator, aux sums) of GRPO (critic=False) or PPO (critic=True).

    params: {"policy": model params (plain or LoRA), "value": scalar head} (the value head only with a critic)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    logp, ent, hidden = token_stats(params["policy"], batch, config, chunk)
    pg, clipped, ratio = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], clip_eps)
    kl = k3_kl(logp, batch["ref_logp"])
    per_tok = pg + kl_coef * kl - entropy_coef * ent
    aux = {"ce_sum": jnp.sum(pg * mask), "z_sum": jnp.zeros((), jnp.float32),
           "kl": jnp.sum(kl * mask), "entropy": jnp.sum(ent * mask), "clip_frac": jnp.sum(clipped * mask),
           "ratio": jnp.sum(ratio * mask), "logp_err": jnp.sum(jnp.abs(logp - batch["old_logp"]) * mask)}
    if critic:
        values = apply_value_head(params["value"], hidden)
        vl = clipped_value_loss(values, batch["old_values"], batch["returns"], value_clip)
        per_tok = per_tok + vf_coef * vl
        aux["value_loss"] = jnp.sum(vl * mask)
    return jnp.sum(per_tok * mask), jnp.sum(mask), aux


def make_rl_loss(*, clip_eps: float, kl_coef: float, entropy_coef: float = 0.0, vf_coef: float = 0.0,
                 value_clip: float = 0.2, critic: bool = False, chunk: int = 0):
    return lambda params, batch, config: rl_loss(params, batch, config, clip_eps=clip_eps, kl_coef=kl_coef,
                                                 entropy_coef=entropy_coef, vf_coef=vf_coef, value_clip=value_clip,
                                                 critic=critic, chunk=chunk)


def reference_pass(policy: Any, reference: Any, value_head: Any, batch: dict[str, jax.Array], config: ModelConfig,
                   chunk: int = 0, *, policy_logp: bool = False) -> dict[str, jax.Array]:
    """What a rollout batch needs before the update, in one jitted call: the reference's log-probs and, with a
    critic, the values at rollout (and, with policy_logp, the policy's own log-probs to replace the engine's),
    the latter two from one policy forward."""
    ref_lp, _, _ = token_stats(reference, batch, config, chunk)
    out = {"ref_logp": ref_lp}
    if value_head is not None or policy_logp:
        lp, _, hidden = token_stats(policy, batch, config, chunk)
        if policy_logp:
            out["logp"] = lp
        if value_head is not None:
            out["values"] = apply_value_head(value_head, hidden)
    return out
