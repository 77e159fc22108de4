"""Parameter memory of full, LoRA and QLoRA fine-tuning: measured on real params or, with `jax.eval_shape`,
on a full-size preset without allocating a byte of weights."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from internlm_jax.config import ModelConfig
from internlm_jax.model import init_params
from internlm_jax.peft.lora import LoraWeight, apply_lora
from internlm_jax.quant.int4 import DEFAULT_TARGETS, QuantizedLinear, quantize_params


def _nbytes(tree: Any, count: bool = False) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            continue  # dropout keys exist only inside a training step
        total += int(math.prod(x.shape)) * (1 if count else jnp.dtype(x.dtype).itemsize)
    return total


def param_memory_report(params: Any) -> dict[str, int]:
    """Bytes of the params (arrays or ShapeDtypeStructs): {"frozen", "adapters", "total", "int4" (packed
    weights + scales + zeros inside QuantizedLinear), "trainable"}. Without adapters every leaf is trainable
    (full fine-tuning) and "frozen" is 0. "trainable_params" counts trainable elements."""
    adapters = frozen = int4 = n_adapter = 0
    for x in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, (LoraWeight, QuantizedLinear))):
        if isinstance(x, LoraWeight):
            adapters += _nbytes((x.a, x.b))
            n_adapter += _nbytes((x.a, x.b), count=True)
            frozen += _nbytes(x.base)
            if isinstance(x.base, QuantizedLinear):
                int4 += _nbytes(x.base)
        else:
            frozen += _nbytes(x)
            if isinstance(x, QuantizedLinear):
                int4 += _nbytes(x)
    if adapters == 0:
        return {"frozen": 0, "adapters": 0, "total": frozen, "int4": int4, "trainable": frozen,
                "trainable_params": _nbytes(params, count=True)}
    return {"frozen": frozen, "adapters": adapters, "total": frozen + adapters, "int4": int4, "trainable": adapters,
            "trainable_params": n_adapter}


def memory_comparison(config: ModelConfig, *, rank: int = 64, alpha: float = 16.0, group_size: int = 128,
                      targets: tuple[str, ...] = DEFAULT_TARGETS, base_dtype: str = "bfloat16",
                      adapter_dtype: str = "float32", params: Any = None) -> list[dict[str, Any]]:
    """Rows for full fine-tuning (base_dtype), LoRA (frozen base_dtype + adapters) and QLoRA (int4 base +
    adapters). Shapes only (jax.eval_shape) unless real `params` are given (then they are quantized and wrapped
    for real). Each row: mode, frozen / adapters / total bytes, and AdamW state bytes (two fp32 moments per
    trainable parameter, as the training loop keeps)."""
    if params is not None:
        base_dtype = jnp.dtype(params["embed"].dtype).name
    cfg = config.replace(param_dtype=base_dtype)
    key = jax.random.key(0)

    def full(k):
        return init_params(cfg, k)

    def lora(k):
        return apply_lora(full(k) if params is None else params, cfg, targets=targets, rank=rank, alpha=alpha,
                          key=k, dtype=jnp.dtype(adapter_dtype))

    def qlora(k):
        base = quantize_params(full(k) if params is None else params, cfg, group_size=group_size, targets=targets)
        return apply_lora(base, cfg, targets=targets, rank=rank, alpha=alpha, key=k, dtype=jnp.dtype(adapter_dtype))

    rows = []
    modes = ((f"full ({base_dtype})", full), (f"LoRA r={rank}", lora), (f"QLoRA int4 g{group_size} r={rank}", qlora))
    for mode, fn in modes:
        if params is None:
            tree = jax.eval_shape(fn, key)
        else:
            tree = params if fn is full else fn(key)
        rep = param_memory_report(tree)
        rows.append({"mode": mode, **rep, "adam_state": 8 * rep["trainable_params"]})
    return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB" if n >= 2**17 else f"{n / 2**10:.1f} KiB"


def format_memory_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """A markdown table of `memory_comparison` rows."""
    head = "| mode | frozen | adapters | params total | trainable params | AdamW state | params + state |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {_gib(r['frozen'])} | {_gib(r['adapters'])} | {_gib(r['total'])} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {_gib(r['adam_state'])} | "
                     f"{_gib(r['total'] + r['adam_state'])} |")
    return "\n".join(lines)
