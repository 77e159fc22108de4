"""LoRA and QLoRA: the `LoraWeight` weight type, `apply_lora`, the trainable mask, merge and split.

A LoRA weight computes y = base(x) + (alpha / r) * (dropout(x) @ A) @ B without ever forming a merged matrix:
A [*lead, *in, r], B [*lead, r, *out] (lead = the stacked layer axis L for layer weights), B starts at zero so
a fresh adapter leaves the model's outputs exactly unchanged. The base is a dense array (LoRA) or an int4
`QuantizedLinear` (QLoRA: the frozen base is dequantized on the fly inside the int4 op the serving path uses).
The letter R in einsum strings is the adapter rank.

Dropout (on the adapter's input only, as PEFT does) needs randomness inside `lax.scan`, so it rides in the
params: `enable_dropout(params, key)` gives every LoraWeight with rate > 0 a `dropout_key` leaf (one key per
layer, sliced by the scan like any other leaf). Call it inside the loss function of a training step, e.g.
`params = enable_dropout(params, jax.random.fold_in(rng, step))`; without it (evaluation, serving) dropout is
off. `trainable_mask` is computed on params without keys and marks only A and B as trainable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.layers import linear
from internlm_jax.quant.int4 import DEFAULT_TARGETS, LINEAR_AXES, QuantizedLinear, check_targets, target_path

Params = dict[str, Any]


@flax.struct.dataclass
class LoraWeight:
    """base(x) + (alpha / rank) * (x @ a) @ b. `base` is an array, a QuantizedLinear, or None in an adapter
    tree (`split_adapters`)."""

    base: Any
    a: jax.Array  # [*lead, *in, R]
    b: jax.Array  # [*lead, R, *out]
    dropout_key: jax.Array | None = None  # [*lead] PRNG keys while training with dropout, else None
    alpha: float = flax.struct.field(pytree_node=False, default=16.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    in_ndim: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def lead_ndim(self) -> int:
        return self.a.ndim - 1 - self.in_ndim

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[self.lead_ndim: -1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.b.shape[self.lead_ndim + 1:])

    def linear(self, x: Array, in_axes: str, out_axes: str, dtype: Any) -> Array:
        """layers.linear hook: the base's output plus the low-rank update, in `dtype`."""
        if self.base is None:
            raise ValueError("this LoraWeight has no base (an adapter tree from split_adapters); "
                             "use merge_adapters(base_params, adapters) first")
        if self.lead_ndim:
            raise ValueError(f"LoraWeight holds a stack of {self.a.shape[:self.lead_ndim]} adapters; slice one "
                             "layer (lax.scan over params['layers'] does this) before calling linear")
        if len(in_axes) != self.in_ndim or len(out_axes) != self.b.ndim - 1:
            raise ValueError(f"LoraWeight with in_shape {self.in_shape}, out_shape {self.out_shape} used as "
                             f"{in_axes}->{out_axes}")
        y = linear(x, self.base, in_axes, out_axes, dtype)
        h = x.astype(dtype)
        if self.dropout > 0.0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), jnp.zeros((), dtype))
        lead = "ZYXW"[: x.ndim - len(in_axes)]
        xa = jnp.einsum(f"{lead}{in_axes},{in_axes}R->{lead}R", h, self.a.astype(dtype))
        delta = jnp.einsum(f"{lead}R,R{out_axes}->{lead}{out_axes}", xa, self.b.astype(dtype))
        return y + (self.scale * delta).astype(y.dtype)

    def delta(self, dtype: Any = jnp.float32) -> Array:
        """The dense update (alpha / r) * a @ b, shaped like the base weight."""
        lead = self.a.shape[: self.lead_ndim]
        a = self.a.astype(jnp.float32).reshape(*lead, -1, self.rank)
        b = self.b.astype(jnp.float32).reshape(*lead, self.rank, -1)
        d = self.scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        return d.reshape(*lead, *self.in_shape, *self.out_shape).astype(dtype)

    def to_dense(self) -> Array:
        """The merged weight (for HF export via `checkpoint.hf.dense_weight`)."""
        return merged_weight(self)


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeight)


def _base_info(base: Any, name: str) -> tuple[int, tuple[int, ...], tuple[int, ...], Any]:
    """(lead ndim, in shape, out shape, dtype) of a target's base weight."""
    in_ndim = len(LINEAR_AXES[name][0])
    lead = 0 if name == "output" else 1
    if isinstance(base, QuantizedLinear):
        if len(base.lead_shape) != lead:
            raise ConfigError(f"{name}: int4 base has leading axes {base.lead_shape}, expected {lead}")
        return lead, base.in_shape, base.out_shape, base.weight.scales.dtype
    if isinstance(base, LoraWeight):
        raise ConfigError(f"{name} already has LoRA adapters; merge_lora(params) or split_adapters(params) first")
    if not hasattr(base, "shape") or hasattr(base, "linear"):
        raise ConfigError(f"{name}: cannot add LoRA to a {type(base).__name__}; expected an array or a "
                          "QuantizedLinear")
    shape = tuple(base.shape)
    return lead, shape[lead: lead + in_ndim], shape[lead + in_ndim:], base.dtype


def apply_lora(params: Params, config: ModelConfig, *, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 64,
               alpha: float = 16.0, key: jax.Array, dropout: float = 0.0, dtype: Any = jnp.float32) -> Params:
    """Wrap the `targets` weights in LoraWeight: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's Kaiming-uniform
    default), B = 0, scale alpha / rank, adapters stored in `dtype`. Works on dense or int4 (QLoRA) bases."""
    targets = check_targets(targets, "LoRA targets")
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"lora alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora dropout must be in [0, 1), got {dropout!r}")
    out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))
    plan = []
    for name in targets:
        path = target_path(name)
        base = _get(params, path)
        lead, in_shape, out_shape, _ = _base_info(base, name)
        lead_shape = (config.num_layers,) * lead
        fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
        if rank > min(fan_in, fan_out):
            raise ConfigError(f"LoRA rank {rank} exceeds {name}'s smallest dimension ({min(fan_in, fan_out)})")
        if lead and tuple(getattr(base, "lead_shape", None) or base.shape[:1]) != lead_shape:
            raise ConfigError(f"{name} has {tuple(base.shape[:1])} stacked layers but the config says "
                              f"{config.num_layers}: wrong config for these params")
        plan.append((path, base, in_shape, ((*lead_shape, *in_shape, rank), (*lead_shape, rank, *out_shape), fan_in)))
    # All adapters come from one compiled program (compiles dominate on small models).
    ab = _init_adapters(key, tuple(p[3] for p in plan), jnp.dtype(dtype))
    for (path, base, in_shape, _), (a, b) in zip(plan, ab):
        _set(out, path, LoraWeight(base=base, a=a, b=b, alpha=float(alpha), dropout=float(dropout),
                                   in_ndim=len(in_shape)))
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_adapters(key, shapes, dtype):
    """shapes[i] = (a shape, b shape, fan_in) -> ((a, b), ...): A ~ U(+-1/sqrt(fan_in)), B = 0.

    One uniform draw is cut into all the A matrices: each threefry call costs about a second of XLA compile
    on CPU, so one call instead of one per target keeps apply_lora quick on small models."""
    sizes = [math.prod(a_shape) for a_shape, _, _ in shapes]
    u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, start = [], 0
    for (a_shape, b_shape, fan_in), n in zip(shapes, sizes):
        a = (u[start: start + n] / math.sqrt(fan_in)).reshape(a_shape).astype(dtype)
        out.append((a, jnp.zeros(b_shape, dtype)))
        start += n
    return tuple(out)


def trainable_mask(params: Params) -> Any:
    """A tree of bools shaped like `params`: True only for the a / b leaves of LoraWeight adapters."""
    def go(x):
        if isinstance(x, LoraWeight):
            return x.replace(base=jax.tree.map(lambda _: False, x.base), a=True, b=True,
                             dropout_key=None if x.dropout_key is None else jax.tree.map(lambda _: False,
                                                                                        x.dropout_key))
        return jax.tree.map(lambda _: False, x)
    return jax.tree.map(go, params, is_leaf=_is_lora)


def is_adapter_path(path: str, leaf: Any = None) -> bool:
    """The same rule as `trainable_mask` for path predicates (`jax.tree_util.keystr` paths, e.g.
    "['layers']['wqkv'].a"): a LoraWeight's `.a` or `.b` field."""
    return path.endswith((".a", ".b"))


def enable_dropout(params: Params, key: jax.Array) -> Params:
    """Give each LoraWeight with dropout > 0 fresh dropout keys (one per stacked layer)."""
    loras = [x for x in jax.tree.leaves(params, is_leaf=_is_lora) if _is_lora(x) and x.dropout > 0.0]
    counts = [math.prod(x.a.shape[: x.lead_ndim]) for x in loras]
    if not loras:
        return params
    keys = jax.random.split(key, sum(counts))  # one split (one threefry) for all of them
    starts = iter(np.cumsum([0] + counts[:-1]).tolist())

    def go(x):
        if not _is_lora(x) or x.dropout <= 0.0:
            return x
        lead = x.a.shape[: x.lead_ndim]
        s = next(starts)
        return x.replace(dropout_key=keys[s: s + math.prod(lead)].reshape(lead) if lead else keys[s])
    return jax.tree.map(go, params, is_leaf=_is_lora)


def merged_weight(w: LoraWeight, dtype: Any = None) -> Array:
    """base + (alpha / r) a @ b as a dense array (an int4 base is dequantized first), in `dtype` (default: the
    base's dtype, or the int4 scales' dtype)."""
    if w.base is None:
        raise ConfigError("cannot merge an adapter without a base: merge_adapters(base_params, adapters) first")
    if isinstance(w.base, QuantizedLinear):
        base = w.base.dequantize(jnp.float32)
        dtype = dtype or w.base.weight.scales.dtype
    else:
        base = w.base.astype(jnp.float32)
        dtype = dtype or w.base.dtype
    if base.shape != w.a.shape[: w.lead_ndim] + w.in_shape + w.out_shape:
        raise ConfigError(f"adapter shapes a {w.a.shape} / b {w.b.shape} do not fit a base of shape {base.shape}")
    return (base + w.delta(jnp.float32)).astype(dtype)


def merge_lora(params: Params, dtype: Any = None) -> Params:
    """Plain params: every LoraWeight replaced by its merged dense weight (QLoRA bases dequantized). Int4
    weights that carry no adapter stay QuantizedLinear (see quant.dequantize_params)."""
    if not any(_is_lora(x) for x in jax.tree.leaves(params, is_leaf=_is_lora)):
        return params
    return _merge_jit(params, None if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _merge_jit(params: Params, dtype: Any) -> Params:
    # One program for the whole tree: eager per-weight merges would compile once per weight shape.
    return jax.tree.map(lambda x: merged_weight(x, dtype) if _is_lora(x) else x, params, is_leaf=_is_lora)


def split_adapters(params: Params) -> tuple[Params, Params]:
    """(base params with adapters removed, adapter tree). The adapter tree holds LoraWeight(base=None) at the
    adapted paths only (rank, alpha, dropout kept), e.g. {"layers": {"wqkv": LoraWeight}, "output": ...}."""
    base = jax.tree.map(lambda x: x.base if _is_lora(x) else x, params, is_leaf=_is_lora)
    adapters: Params = {}
    for path, x in _walk(params):
        if _is_lora(x):
            _set(adapters, path, x.replace(base=None, dropout_key=None), create=True)
    if not adapters:
        raise ConfigError("params hold no LoRA adapters (apply_lora adds them)")
    return base, adapters


def merge_adapters(base_params: Params, adapters: Params) -> Params:
    """Put an adapter tree (from split_adapters / load_adapters) back onto base params; checks every shape."""
    out = jax.tree.map(lambda x: x, base_params, is_leaf=lambda x: not isinstance(x, dict))
    found = [(p, x) for p, x in _walk(adapters)]
    if not found:
        raise ConfigError("the adapter tree is empty")
    for path, ad in found:
        where = "/".join(path)
        if not _is_lora(ad):
            raise ConfigError(f"adapters/{where} is a {type(ad).__name__}, not a LoraWeight")
        name = "output" if path == ("output",) else path[-1]
        if name not in LINEAR_AXES or target_path(name) != path:
            raise ConfigError(f"adapter at {where} does not name a linear layer; valid: {', '.join(LINEAR_AXES)}")
        try:
            base = _get(base_params, path)
        except ConfigError:
            raise ConfigError(f"the base params have no {where} to attach an adapter to") from None
        lead, in_shape, out_shape, _ = _base_info(base, name)
        lead_shape = tuple(base.lead_shape if isinstance(base, QuantizedLinear) else base.shape[:lead])
        want_a, want_b = (*lead_shape, *in_shape, ad.rank), (*lead_shape, ad.rank, *out_shape)
        if tuple(ad.a.shape) != want_a or tuple(ad.b.shape) != want_b:
            raise ConfigError(f"adapter {where} (a {list(ad.a.shape)}, b {list(ad.b.shape)}) does not fit the base "
                              f"weight of shape {list(lead_shape + in_shape + out_shape)} (needs a {list(want_a)}, "
                              f"b {list(want_b)}): the adapters were trained on a model of another shape")
        _set(out, path, ad.replace(base=base))
    return out


def lora_summary(params: Params) -> dict[str, Any]:
    """{"targets": [...], "rank", "alpha", "dropout"} of the adapters in a params or adapter tree (rank, alpha
    and dropout are None when they differ between targets)."""
    found = [(p, x) for p, x in _walk(params) if _is_lora(x)]
    if not found:
        raise ConfigError("params hold no LoRA adapters")

    def same(vals):
        return vals[0] if all(v == vals[0] for v in vals) else None
    return {"targets": [p[-1] for p, _ in found], "rank": same([x.rank for _, x in found]),
            "alpha": same([x.alpha for _, x in found]), "dropout": same([x.dropout for _, x in found])}


def _walk(tree: Any, prefix: tuple[str, ...] = ()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, prefix + (k,))
    else:
        yield prefix, tree


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    try:
        for k in path:
            tree = tree[k]
    except (KeyError, TypeError):
        raise ConfigError(f"params lack {'/'.join(path)}: expected the tree of internlm_jax.model.init_params") from None
    return tree


def _set(tree: Params, path: tuple[str, ...], value: Any, create: bool = False) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {}) if create else tree[k]
    tree[path[-1]] = value
