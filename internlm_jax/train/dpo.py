"""DPO / IPO losses on packed preference pairs, and the reference model's log-probs (precomputed or on the fly).

A batch from `internlm_jax.data.sft.PackedBatches(dpo=True)` holds, besides the usual [B, T] arrays,
`pair_index` (which pair of its row a position belongs to, -1 = padding), `pair_sign` (+1 chosen, -1 rejected)
and, when precomputed, `ref_logp` (the reference model's log-prob of each target). Per pair p the sums over
its loss positions give the policy log-probs pi_c, pi_r and reference log-probs rf_c, rf_r, and

    h = (pi_c - pi_r) - (rf_c - rf_r)
    sigmoid (DPO):  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    IPO:            loss = (h - 1 / (2 beta))^2, with log-probs averaged over each side's tokens
    rewards:        r_c = beta (pi_c - rf_c), r_r = beta (pi_r - rf_r); accuracy = mean[r_c > r_r]

The loss function returns (sum of pair losses, number of pairs, aux sums) like every loss of the training loop,
so gradient accumulation over micro-batches is exact; the aux sums (reward accuracy, margin, chosen / rejected
rewards and log-probs) become per-pair means in the step metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.data.sft import Unit, build_rows, pack_best_fit, unit_positions
from internlm_jax.model import forward
from internlm_jax.train.losses import output_token_ce
from internlm_jax.train.step import Batch, LossFn

REFERENCE_FILE = "dpo_reference.npz"
DPO_KEYS = ("pair_index", "pair_sign")


def token_logps(params: Any, batch: Batch, config: ModelConfig, chunk: int = 0, fused: bool = True
                ) -> Float[Array, "B T"]:
    """log p(target) at every position (fp32), through the fused output head (`train.losses`): only
    [B, chunk, V] logits exist at once (chunk 0 = auto)."""
    hidden, _ = forward(params, batch["tokens"], batch["positions"], config=config,
                        segment_ids=batch["segment_ids"], return_hidden=True)
    ce, _ = output_token_ce(hidden, params["output"], batch["targets"], chunk=chunk,
                            dtype=jnp.dtype(config.dtype), fused=fused)
    return -ce


def reference_params(params: Any) -> Any:
    """The base model under LoRA / QLoRA adapters (what `dpo.reference: on_the_fly` compares against)."""
    from internlm_jax.peft import LoraWeight

    is_lora = lambda x: isinstance(x, LoraWeight)
    return jax.tree.map(lambda x: x.base if is_lora(x) else x, params, is_leaf=is_lora)


def pair_sums(values: Float[Array, "B T"], batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per pair (B * T/2 slots: a pair needs >= 2 positions), sums of `values` over the chosen and over the
    rejected loss positions. Slot of a position = row * T/2 + pair_index; padding goes to a dropped slot."""
    B, T = values.shape
    slots = B * (T // 2)
    idx = batch["pair_index"]
    slot = jnp.where(idx >= 0, jnp.arange(B, dtype=jnp.int32)[:, None] * (T // 2) + idx, slots)
    mask = batch["loss_mask"].astype(jnp.float32)
    sign = batch["pair_sign"]

    def seg(v):
        return jax.ops.segment_sum(v.reshape(-1), slot.reshape(-1), num_segments=slots + 1)[:slots]

    return seg(values * mask * (sign > 0)), seg(values * mask * (sign < 0))


def dpo_loss(params: Any, batch: Batch, config: ModelConfig, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, reference: str = "precompute", chunk: int = 0
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    lp = token_logps(params, batch, config, chunk)
    if reference == "precompute":
        if "ref_logp" not in batch:
            raise ConfigError("dpo.reference is precompute but the batch has no ref_logp (reference log-probs "
                              "were not computed)")
        ref = batch["ref_logp"]
    else:
        ref = jax.lax.stop_gradient(token_logps(reference_params(params), batch, config, chunk))
    pc, pr = pair_sums(lp, batch)
    rc, rr = pair_sums(ref, batch)
    nc, nr = pair_sums(jnp.ones_like(lp), batch)
    valid = ((nc > 0) & (nr > 0)).astype(jnp.float32)
    if loss_type == "ipo":  # IPO compares length-averaged log-probs
        pc, pr, rc, rr = pc / jnp.maximum(nc, 1), pr / jnp.maximum(nr, 1), rc / jnp.maximum(nc, 1), \
            rr / jnp.maximum(nr, 1)
    h = (pc - pr) - (rc - rr)
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) \
            - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    total = jnp.sum(losses * valid)
    aux = {"ce_sum": total, "z_sum": jnp.zeros((), jnp.float32),
           "reward_accuracy": jnp.sum((r_c > r_r) * valid), "reward_margin": jnp.sum((r_c - r_r) * valid),
           "reward_chosen": jnp.sum(r_c * valid), "reward_rejected": jnp.sum(r_r * valid),
           "logp_chosen": jnp.sum(pc * valid), "logp_rejected": jnp.sum(pr * valid)}
    return total, jnp.sum(valid), aux


def make_dpo_loss(beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  reference: str = "precompute", chunk: int = 0) -> LossFn:
    return lambda params, batch, config: dpo_loss(params, batch, config, beta=beta, loss_type=loss_type,
                                                  label_smoothing=label_smoothing, reference=reference,
                                                  chunk=chunk)


# ---- reference log-probs, computed once ------------------------------------------------------------------
def precompute_reference(params: Any, config: ModelConfig, units: Sequence[Unit], seq_len: int, batch_rows: int,
                         *, pad_id: int, chunk: int = 0, progress: bool = True) -> None:
    """Fill `ref` (log-prob of every target) of each sequence in `units` with the model `params` (the policy
    at step 0). Rows are spread over the mesh of `params` like training batches; every process ends up with all
    values."""
    from jax.sharding import NamedSharding

    from internlm_jax.sharding import named_sharding, use_mesh

    leaf = next(x for x in jax.tree.leaves(params) if isinstance(getattr(x, "sharding", None), NamedSharding))
    mesh = leaf.sharding.mesh
    sharding = named_sharding(mesh, ("batch", "length"))
    batch_rows = max(batch_rows, mesh.shape["data"] * mesh.shape["fsdp"])
    lengths = [unit_positions(u) for u in units]
    rows = pack_best_fit(lengths, seq_len, list(range(len(units))))
    nproc, pid = jax.process_count(), jax.process_index()
    per = batch_rows // nproc

    @jax.jit
    def run(p, b):
        with use_mesh(mesh):
            return token_logps(p, b, config, chunk)

    it = range(0, len(rows), batch_rows)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="reference log-probs", unit="batch", total=-(-len(rows) // batch_rows))
    for start in it:
        group = rows[start: start + batch_rows]
        group = group + [[] for _ in range(batch_rows - len(group))]
        host = build_rows(units, group[pid * per:(pid + 1) * per], seq_len, pad_id, dpo=True)
        batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
        lp = run(params, batch)
        if nproc > 1:
            from jax.experimental import multihost_utils

            lp = multihost_utils.process_allgather(lp, tiled=True)
        lp = np.asarray(lp, np.float32)
        for r, row in enumerate(group):
            t = 0
            for u in row:
                for s in units[u]:
                    s.ref = lp[r, t: t + s.positions].copy()
                    t += s.positions


def _checksum(units: Sequence[Unit]) -> int:
    import zlib

    crc = 0
    for u in units:
        for s in u:
            crc = zlib.crc32(np.ascontiguousarray(s.ids, np.int32).tobytes(), crc)
    return crc


def save_reference(path: str, units: Sequence[Unit]) -> None:
    """The reference log-probs of `units`, with a checksum of their tokens (a resumed run checks it)."""
    flat = np.concatenate([s.ref for u in units for s in u]).astype(np.float32)
    lengths = np.asarray([s.positions for u in units for s in u], np.int64)
    tmp = path + ".tmp.npz"
    np.savez(tmp, ref=flat, lengths=lengths, checksum=np.int64(_checksum(units)))
    os.replace(tmp, path)


def load_reference(path: str, units: Sequence[Unit]) -> None:
    with np.load(path) as f:
        flat, lengths, checksum = f["ref"], f["lengths"], int(f["checksum"])
    want = np.asarray([s.positions for u in units for s in u], np.int64)
    if lengths.shape != want.shape or not np.array_equal(lengths, want) or checksum != _checksum(units):
        raise ConfigError(f"{path} holds reference log-probs for another dataset ({len(lengths)} sequences, this "
                          f"one has {len(want)}, or other tokens); resume with the original dataset, or start in a "
                          "new output_dir")
    offsets = np.concatenate([[0], np.cumsum(want)])
    k = 0
    for u in units:
        for s in u:
            s.ref = flat[offsets[k]: offsets[k + 1]]
            k += 1


def evaluate_pairs(params: Any, config: ModelConfig, units: Sequence[Unit], seq_len: int, *, beta: float,
                   loss_type: str = "sigmoid", pad_id: int = 0, batch_rows: int = 8) -> dict[str, float]:
    """Mean DPO loss, reward accuracy and reward margin of `params` over all `units` (pairs whose `ref` is set),
    on the default device."""
    rows = pack_best_fit([unit_positions(u) for u in units], seq_len, list(range(len(units))))
    fn = jax.jit(lambda p, b: dpo_loss(p, b, config, beta=beta, loss_type=loss_type))
    sums: dict[str, float] = {}
    pairs = 0.0
    for start in range(0, len(rows), batch_rows):
        group = rows[start: start + batch_rows]
        group = group + [[] for _ in range(batch_rows - len(group))]
        host = build_rows(units, group, seq_len, pad_id, dpo=True, with_ref=True)
        _, n, aux = jax.device_get(fn(params, {k: jnp.asarray(v) for k, v in host.items()}))
        pairs += float(n)
        for k, v in aux.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    out = {k: v / max(pairs, 1.0) for k, v in sums.items() if k != "z_sum"}
    out["loss"] = out.pop("ce_sum")
    out["pairs"] = pairs
    return out
