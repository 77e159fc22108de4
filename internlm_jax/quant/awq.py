"""AWQ-style activation-aware scaling (Lin et al., 2023) for int4 weight-only quantization.

Why it helps: a weight row that meets a large activation channel contributes that channel's magnitude times
its rounding error to the output. Scaling row i of W up by s_i (and the activation channel down by 1/s_i, so
x @ W is unchanged in exact arithmetic) makes that row's share of the group's range larger, so its relative
rounding error shrinks; rows of quiet channels pay, but they matter less. With s = mag^alpha, alpha = 0 is
plain round-to-nearest, so the grid search never does worse than RTN on the calibration activations.

Procedure, layer by layer on calibration tokens (the model's own `_layer` runs with tapping weights that
record the input of every linear; the next layer sees the full-precision output):
  1. per input channel, mag = mean |x| over the calibration tokens;
  2. for alpha in {0, 1/n, ..., 1}: s = mag^alpha normalised by sqrt(max(s) min(s)), quantize W * s (rows),
     measure mean((x / s) @ Q(W * s) - x @ W)^2 summed over the weights sharing that input; keep the best;
  3. fold 1/s into what produces x, which keeps the full-precision model exactly equivalent:
       wqkv    <- attention_norm weight        w1, w3 (one shared s) <- ffn_norm weight
       wo      <- the v columns of wqkv (s tied across the G query heads of a kv head, because they all read
                  the same v; attention output is linear in v)
       w2      <- the output columns of w3 (silu(w1 x) * (w3 x) is linear in w3's output)
       output  <- the final norm weight
  4. round-to-nearest on the scaled weights (`quantize_params`).
The clipping search of the original AWQ is not implemented.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from internlm_jax import model as model_lib
from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.layers import linear, rms_norm, rope_tables
from kernels_pallas.int4_matmul import dequantize_int4, quantize_int4

# Scale groups: weights that share one input (and so one scale), and their label in the report.
GROUPS: dict[str, tuple[str, ...]] = {"wqkv": ("wqkv",), "wo": ("wo",), "w1_w3": ("w1", "w3"), "w2": ("w2",),
                                      "output": ("output",)}
_TAP_OF = {"wqkv": "wqkv", "wo": "wo", "w1_w3": "w1", "w2": "w2"}  # which linear's input each group reads


class _Tap:
    """A weight stand-in whose `linear` records its input (during tracing) and then runs the real weight."""

    def __init__(self, weight: Any, name: str, store: dict[str, Array]):
        self.weight, self.name, self.store = weight, name, store

    def linear(self, x: Array, in_axes: str, out_axes: str, dtype: Any) -> Array:
        self.store[self.name] = x
        return linear(x, self.weight, in_axes, out_axes, dtype)


@functools.partial(jax.jit, static_argnums=0)
def _tapped_layer(config: ModelConfig, x, lp, cos, sin, positions, select):
    """One decoder block; returns its output, per-channel sum |x| of each linear input, and the rows `select`."""
    store: dict[str, Array] = {}
    lp = dict(lp)
    for name in ("wqkv", "wo", "w1", "w2"):
        lp[name] = _Tap(lp[name], name, store)
    y, _ = model_lib._layer(config, x, lp, cos, sin, positions, None, None, None, 0)
    sums, rows = {}, {}
    for name, v in store.items():
        flat = v.reshape(-1, math.prod(v.shape[2:])).astype(jnp.float32)
        sums[name] = jnp.sum(jnp.abs(flat), axis=0)
        rows[name] = flat[select]
    return y, sums, rows


@functools.partial(jax.jit, static_argnums=0)
def _final_input(config: ModelConfig, x, norm, select):
    h = rms_norm(x, norm, config.rms_norm_eps)
    flat = h.reshape(-1, h.shape[-1]).astype(jnp.float32)
    return jnp.sum(jnp.abs(flat), axis=0), flat[select]


def _qdq(w: Float[Array, "Din Dout"], group_size: int, zero_point: bool) -> Float[Array, "Din Dout"]:
    return dequantize_int4(quantize_int4(w, group_size, symmetric=not zero_point), jnp.float32)


@functools.partial(jax.jit, static_argnames=("group_size", "zero_point", "n_grid", "tie"))
def search_scale(x: Float[Array, "n Din"], weights: tuple[Float[Array, "Din Dout"], ...], mag: Float[Array, Din],
                 *, group_size: int, zero_point: bool, n_grid: int = 20, tie: tuple[int, int, int] | None = None
                 ) -> tuple[Float[Array, ""], Float[Array, Din], Float[Array, A]]:
    """The AWQ grid search for weights sharing input x: (best alpha, its scale s [Din], errors per alpha).

    `tie` = (K, G, H) makes s equal across the G axis of a [K, G, H] input (wo, whose scale folds into v).
    errors[0] (alpha = 0, s = 1) is plain round-to-nearest.
    """
    mag = jnp.maximum(mag.astype(jnp.float32), 0.0)
    if tie is not None:
        k, g, h = tie
        mag = jnp.broadcast_to(jnp.mean(mag.reshape(k, g, h), axis=1, keepdims=True), (k, g, h)).reshape(-1)
    refs = tuple(x @ w for w in weights)
    alphas = jnp.arange(n_grid + 1, dtype=jnp.float32) / n_grid

    def scale_for(alpha):
        s = jnp.maximum(mag ** alpha, 1e-4)
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def err_for(alpha):
        s = scale_for(alpha)
        err = jnp.float32(0.0)
        for w, ref in zip(weights, refs):
            q = _qdq(w * s[:, None], group_size, zero_point) / s[:, None]
            err = err + jnp.mean((x @ q - ref) ** 2)
        return err

    errs = jax.lax.map(err_for, alphas)
    best = jnp.argmin(errs)
    return alphas[best], scale_for(alphas[best]), errs


def calibration_batches(calib: Any, vocab_size: int, batch_size: int = 8) -> list[np.ndarray]:
    """Token ids [N, T] (split into rows of batch_size) or a list of equal-shape [B, T] arrays."""
    if isinstance(calib, (list, tuple)) and calib and np.ndim(calib[0]) == 2:
        batches = [np.asarray(b) for b in calib]
    else:
        arr = np.asarray(calib)
        if arr.ndim != 2:
            raise ConfigError(f"calibration tokens must be [N, T] token ids (or a list of [B, T]), got shape "
                              f"{arr.shape}")
        batches = [arr[i: i + batch_size] for i in range(0, arr.shape[0], batch_size)]
        if len(batches) > 1 and batches[-1].shape != batches[0].shape:
            batches = batches[:-1]  # keep one compiled shape; the ragged tail is dropped
    if not batches or any(b.shape != batches[0].shape for b in batches):
        raise ConfigError(f"calibration batches must share one [B, T] shape, got {[b.shape for b in batches]}")
    b0 = batches[0]
    if b0.shape[1] < 2 or b0.size == 0:
        raise ConfigError(f"calibration batches need at least 2 tokens per row, got shape {b0.shape}")
    for b in batches:
        if not np.issubdtype(b.dtype, np.integer):
            raise ConfigError(f"calibration data must be integer token ids, got dtype {b.dtype}")
        if b.min() < 0 or b.max() >= vocab_size:
            raise ConfigError(f"calibration token ids must be in [0, {vocab_size}), got range "
                              f"[{b.min()}, {b.max()}]")
    return [b.astype(np.int32) for b in batches]


def awq_scale(params: dict[str, Any], config: ModelConfig, calib: Any, *, targets: Sequence[str], group_size: int,
              zero_point: bool = True, n_grid: int = 20, search_tokens: int = 4096, batch_size: int = 8,
              progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Search AWQ scales on the calibration tokens and fold them in. Returns (scaled full-precision params,
    info {"alphas": {group: [alpha per layer]}, "errors": {group: [[rtn_mse, awq_mse] per layer]}})."""
    batches = calibration_batches(calib, config.vocab_size, batch_size)
    groups = {g: tuple(m for m in members if m in targets) for g, members in GROUPS.items()}
    groups = {g: m for g, m in groups.items() if m}
    B, T = batches[0].shape
    per_batch = min(B * T, max(1, -(-search_tokens // len(batches))))
    rng = np.random.default_rng(0)
    selects = [jnp.asarray(np.sort(rng.choice(B * T, per_batch, replace=False))) for _ in batches]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = rope_tables(config, positions)
    dtype = jnp.dtype(config.dtype)
    xs = [jnp.take(params["embed"], jnp.asarray(b), axis=0).astype(dtype) for b in batches]
    K, G, H = config.num_kv_heads, config.groups, config.head_dim

    layer_groups = [g for g in groups if g != "output"]
    scales: dict[str, list[Array]] = {g: [] for g in groups}
    alphas: dict[str, list[float]] = {g: [] for g in groups}
    errors: dict[str, list[list[float]]] = {g: [] for g in groups}
    layers = range(config.num_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="AWQ search", unit="layer")
    for i in layers:
        lp = jax.tree.map(lambda a, i=i: a[i], params["layers"])
        sums: dict[str, Array] = {}
        rows: dict[str, list[Array]] = {}
        new_xs = []
        for x, sel in zip(xs, selects):
            y, s_, r_ = _tapped_layer(config, x, lp, cos, sin, positions, sel)
            new_xs.append(y)
            for k in s_:
                sums[k] = sums.get(k, 0.0) + s_[k]
                rows.setdefault(k, []).append(r_[k])
        xs = new_xs
        n = len(batches) * B * T
        for g in layer_groups:
            tap = _TAP_OF[g]
            ws = tuple(lp[m].reshape(-1, _out_size(config, m)).astype(jnp.float32) for m in groups[g])
            a, s, errs = search_scale(jnp.concatenate(rows[tap]), ws, sums[tap] / n, group_size=group_size,
                                      zero_point=zero_point, n_grid=n_grid, tie=(K, G, H) if g == "wo" else None)
            scales[g].append(s)
            alphas[g].append(float(a))
            errors[g].append([float(errs[0]), float(jnp.min(errs))])
    if "output" in groups:
        sums_o, rows_o = 0.0, []
        for x, sel in zip(xs, selects):
            s_, r_ = _final_input(config, x, params["norm"], sel)
            sums_o, rows_o = sums_o + s_, rows_o + [r_]
        a, s, errs = search_scale(jnp.concatenate(rows_o), (params["output"].astype(jnp.float32),),
                                  sums_o / (len(batches) * B * T), group_size=group_size, zero_point=zero_point,
                                  n_grid=n_grid)
        scales["output"].append(s)
        alphas["output"].append(float(a))
        errors["output"].append([float(errs[0]), float(jnp.min(errs))])
    stacked = {g: jnp.stack(v) for g, v in scales.items()}
    out = fold_scales(params, config, {g: v for g, v in stacked.items() if g != "output"},
                      stacked["output"][0] if "output" in stacked else None)
    return out, {"alphas": alphas, "errors": errors}


def _out_size(config: ModelConfig, name: str) -> int:
    return {"wqkv": config.num_kv_heads * (config.groups + 2) * config.head_dim, "wo": config.hidden_size,
            "w1": config.intermediate_size, "w3": config.intermediate_size, "w2": config.hidden_size}[name]


def fold_scales(params: dict[str, Any], config: ModelConfig, layer_scales: dict[str, Float[Array, "L Din"]],
                output_scale: Float[Array, D] | None = None) -> dict[str, Any]:
    """Multiply weight rows by s and divide what produces their input by s (exact in full precision).

    layer_scales: {"wqkv": [L, D], "wo": [L, K*G*H] (tied across G), "w1_w3": [L, D], "w2": [L, F]}, any
    subset; output_scale: [D] for the output head.
    """
    K, G, H = config.num_kv_heads, config.groups, config.head_dim
    f32 = jnp.float32
    lay = {k: v.astype(f32) for k, v in params["layers"].items()}
    if "wqkv" in layer_scales:
        s = layer_scales["wqkv"].astype(f32)  # [L, D]
        lay["attention_norm"] = lay["attention_norm"] / s
        lay["wqkv"] = lay["wqkv"] * s[:, :, None, None, None]
    if "wo" in layer_scales:
        s = layer_scales["wo"].astype(f32).reshape(-1, K, G, H)
        lay["wo"] = lay["wo"] * s[..., None]
        v_scale = s[:, :, 0, :]  # tied across G: [L, K, H]
        lay["wqkv"] = lay["wqkv"].at[:, :, :, G + 1, :].divide(v_scale[:, None])
    if "w1_w3" in layer_scales:
        s = layer_scales["w1_w3"].astype(f32)
        lay["ffn_norm"] = lay["ffn_norm"] / s
        lay["w1"] = lay["w1"] * s[:, :, None]
        lay["w3"] = lay["w3"] * s[:, :, None]
    if "w2" in layer_scales:
        s = layer_scales["w2"].astype(f32)  # [L, F]
        lay["w2"] = lay["w2"] * s[:, :, None]
        lay["w3"] = lay["w3"] / s[:, None, :]
    out = dict(params)
    out["layers"] = {k: lay[k].astype(v.dtype) for k, v in params["layers"].items()}
    if output_scale is not None:
        s = output_scale.astype(f32)
        out["norm"] = (params["norm"].astype(f32) / s).astype(params["norm"].dtype)
        out["output"] = (params["output"].astype(f32) * s[:, None]).astype(params["output"].dtype)
    return out

