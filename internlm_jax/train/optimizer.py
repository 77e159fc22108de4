"""AdamW with warmup + cosine / WSD schedules, global-norm clipping, weight-decay and trainable masks.

Master weights are the params themselves, stored in `ModelConfig.param_dtype` (float32 for training); the
model casts them to `ModelConfig.dtype` (e.g. bfloat16) inside each matmul, so compute is low precision while
updates accumulate in fp32. Adam moments follow the param dtype (mu optionally bfloat16).

Frozen leaves (LoRA trains adapters only) never enter the optimizer: `trainable_view` replaces them with
`optax.MaskedNode()`, a pytree node with no leaves, so they get no gradient and no optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from internlm_jax.train.config import OptimizerConfig

PathPredicate = Callable[[str, Any], bool]  # (key path like "['layers']['wqkv']", leaf) -> bool


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based count of updates already applied)."""
    warm = min(cfg.warmup_steps, total_steps)
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    # Warmup reaches lr * (s + 1) / warmup_steps at update s, so the first update already moves the weights
    # and update warmup_steps - 1 runs at the peak.
    warmup = optax.linear_schedule(peak / max(warm, 1), peak, max(warm - 1, 1))
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        decay = cfg.decay_steps if cfg.decay_steps is not None else max(total_steps - warm, 1)
        rest = optax.cosine_decay_schedule(peak, max(decay, 1), alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        decay = max(round(cfg.wsd_decay_fraction * total_steps), 1)
        stable = max(total_steps - warm - decay, 0)
        rest = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
                                    [stable])
    else:  # validated by OptimizerConfig
        raise ValueError(cfg.schedule)
    return optax.join_schedules([warmup, rest], [warm]) if warm else rest


def _path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path)


def decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """True where weight decay applies: matrices, but never norm scales (1-D or named *norm*), and the input
    embedding only when `decay_embeddings`. Works on arrays or ShapeDtypeStructs, any pytree layout."""

    def rule(path: tuple[Any, ...], leaf: Any) -> bool:
        name = _path_str(path)
        if "norm" in name or len(getattr(leaf, "shape", ())) < 2:
            return False
        if name.startswith("['embed']"):
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(rule, params)


def trainable_mask(params: Any, trainable: PathPredicate | None) -> Any:
    """Tree of bools; None means every leaf trains."""
    if trainable is None:
        return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(trainable(_path_str(p), x)), params)


def trainable_view(params: Any, mask: Any) -> Any:
    """Params with frozen leaves replaced by MaskedNode (no leaves): what grads and optimizer state see."""
    return jax.tree.map(lambda m, p: p if m else optax.MaskedNode(), mask, params)


def merge_trainable(params: Any, updated_view: Any, mask: Any) -> Any:
    """Put the updated trainable leaves back into the full params tree."""
    leaves, treedef = jax.tree.flatten(params)
    mask_leaves = treedef.flatten_up_to(mask)
    new_leaves = iter(jax.tree.leaves(updated_view))
    return jax.tree.unflatten(treedef, [next(new_leaves) if m else p for m, p in zip(mask_leaves, leaves)])


def build_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The update rule; apply it to the trainable view of the params (see `trainable_view`)."""
    schedule = make_schedule(cfg, total_steps)
    wd_mask = lambda p: decay_mask(p, cfg.decay_embeddings)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=wd_mask, mu_dtype=jnp.dtype(cfg.mu_dtype)))
    return optax.chain(*parts), schedule
