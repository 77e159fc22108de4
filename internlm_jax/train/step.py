"""The loss and the jitted train step: explicit shardings over the mesh, gradient accumulation, metrics.

Train state is a plain dict (orbax saves it as is): {"step": int32[], "params": ..., "opt_state": ...}.
The optimizer sees only trainable leaves (`optimizer.trainable_view`), so frozen leaves have no state.

A loss function returns (numerator, denominator, aux sums) for one micro-batch; the step's loss is
sum(numerators) / sum(denominators) over all micro-batches. Because the denominator (loss-token count) does
not depend on the params, the gradient of that mean is sum(grad numerator) / sum(denominator): k micro-batches
accumulate exactly what one k-times-larger batch computes, up to float summation order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internlm_jax.config import ModelConfig
from internlm_jax.model import forward
from internlm_jax.sharding import constrain, named_sharding, tree_shardings, use_mesh
from internlm_jax.train.losses import output_ce_sums, token_cross_entropy  # noqa: F401 (re-exported)
from internlm_jax.train.optimizer import merge_trainable, trainable_view

Batch = dict[str, jax.Array]  # tokens, targets, positions, segment_ids, loss_mask: each [B, T]
State = dict[str, Any]
LossFn = Callable[[Any, Batch, ModelConfig], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def lm_loss(params: Any, batch: Batch, config: ModelConfig, *, z_loss: float = 0.0, chunk: int = 0,
            fused: bool = True) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Next-token loss summed over `loss_mask` (+ z_loss * sum lse^2), the mask count, and aux sums.

    The output head and the loss run fused (`train.losses.output_ce_sums`): logits exist only `chunk`
    positions at a time (0 = auto, <= 32 MiB of fp32 logits; any chunk, dividing T or not) and the head's
    gradients are formed in the same pass. fused=False (or an int4 / dropout-LoRA head) takes the generic
    path through layers.linear (chunk 0 there = full [B, T, V] logits).
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    hidden, _ = forward(params, batch["tokens"], batch["positions"], config=config,
                        segment_ids=batch["segment_ids"], return_hidden=True)
    numer, ce_sum, z_sum = output_ce_sums(hidden, params["output"], batch["targets"], mask, z_loss=z_loss,
                                          chunk=chunk, dtype=jnp.dtype(config.dtype), fused=fused)
    return numer, jnp.sum(mask), {"ce_sum": ce_sum, "z_sum": z_sum}


def default_loss_fn(z_loss: float = 0.0, chunk: int = 0, fused: bool = True) -> LossFn:
    return lambda params, batch, config: lm_loss(params, batch, config, z_loss=z_loss, chunk=chunk, fused=fused)


# ---- shardings -----------------------------------------------------------------------------------------
def _key_tuple(path: tuple[Any, ...]) -> tuple[Any, ...]:
    out = []
    for k in path:
        out.append(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return tuple(out)


def param_shardings(mesh: Mesh, params_shapes: Any, axes: Any) -> Any:
    return tree_shardings(mesh, axes, params_shapes)


def opt_state_shardings(mesh: Mesh, opt_shapes: Any, params_shapes: Any, p_shardings: Any) -> Any:
    """Each optimizer leaf whose key path ends with a param's key path and has that param's shape is sharded
    like the param (Adam mu/nu); anything else (step counts) is replicated."""
    by_path: dict[tuple[Any, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, shape), sh in zip(jax.tree_util.tree_flatten_with_path(params_shapes)[0],
                                 jax.tree.leaves(p_shardings)):
        by_path[_key_tuple(path)] = (tuple(shape.shape), sh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys = _key_tuple(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def state_shardings(mesh: Mesh, abstract_state: State, axes: Any, mask: Any) -> State:
    p_sh = param_shardings(mesh, abstract_state["params"], axes)
    view_shapes = trainable_view(abstract_state["params"], mask)
    view_sh = trainable_view(p_sh, mask)
    return {
        "step": NamedSharding(mesh, PartitionSpec()),
        "params": p_sh,
        "opt_state": opt_state_shardings(mesh, abstract_state["opt_state"], view_shapes, view_sh),
    }


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return named_sharding(mesh, ("batch", "length"))


# ---- the step ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepFns:
    train: Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]
    eval: Callable[[Any, Batch], dict[str, jax.Array]]
    shardings: State
    batch_sharding: NamedSharding


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...: each device's contiguous block of
    the batch holds B/(k*devices) rows of every micro-batch, so the split needs no communication."""
    B = x.shape[0]
    if B % k:
        raise ValueError(f"batch of {B} rows does not split into {k} micro-batches")
    return x.reshape(B // k, k, *x.shape[1:]).swapaxes(0, 1)


def make_step_fns(model_config: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  mesh: Mesh, abstract_state: State, axes: Any, mask: Any, *, grad_accum: int = 1,
                  loss_fn: LossFn | None = None, donate: bool = True) -> StepFns:
    """Jitted train and eval steps with explicit in/out shardings over `mesh`."""
    loss_fn = loss_fn or default_loss_fn()
    shardings = state_shardings(mesh, abstract_state, axes, mask)
    b_sh = batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def micro_grads(params: Any, view: Any, mb: Batch):
        def f(v):
            numer, denom, aux = loss_fn(merge_trainable(params, v, mask), mb, model_config)
            return numer, (denom, aux)

        (numer, (denom, aux)), grads = jax.value_and_grad(f, has_aux=True)(view)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)  # accumulate in fp32
        return grads, numer, denom, aux

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        with use_mesh(mesh):
            params = state["params"]
            view = trainable_view(params, mask)
            if grad_accum == 1:
                grads, numer, denom, aux = micro_grads(params, view, batch)
            else:
                micro = {k: _split_micro(v, grad_accum) for k, v in batch.items()}

                def body(carry, mb):
                    mb = {k: constrain(v, ("batch", "length")) for k, v in mb.items()}
                    g, n, d, a = micro_grads(params, view, mb)
                    return jax.tree.map(jnp.add, carry, (g, n, d, a)), None

                zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), view)
                _, n0, d0, a0 = jax.eval_shape(lambda: micro_grads(params, view, jax.tree.map(lambda x: x[0], micro)))
                init = (zeros, jnp.zeros_like(n0), jnp.zeros_like(d0), jax.tree.map(jnp.zeros_like, a0))
                (grads, numer, denom, aux), _ = jax.lax.scan(body, init, micro)
            denom_safe = jnp.maximum(denom, 1.0)
            grads = jax.tree.map(lambda g: g / denom_safe, grads)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], view)
            new_view = optax.apply_updates(view, updates)
            new_state = {"step": state["step"] + 1, "params": merge_trainable(params, new_view, mask),
                         "opt_state": opt_state}
            metrics = {"loss": aux["ce_sum"] / denom_safe, "z_loss": aux["z_sum"] / denom_safe,
                       "objective": numer / denom_safe, "grad_norm": grad_norm,
                       "lr": jnp.asarray(schedule(state["step"]), jnp.float32), "tokens": denom}
            # Further aux sums of a loss (e.g. DPO reward accuracy / margins) become means per denominator unit.
            metrics.update({k: v / denom_safe for k, v in aux.items() if k not in ("ce_sum", "z_sum")})
            return new_state, metrics

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        with use_mesh(mesh):
            _, denom, aux = loss_fn(params, batch, model_config)
            return {"ce_sum": aux["ce_sum"], "tokens": denom}

    train = jax.jit(train_step, in_shardings=(shardings, b_sh), out_shardings=(shardings, replicated),
                    donate_argnums=(0,) if donate else ())
    evaluate = jax.jit(eval_step, in_shardings=(shardings["params"], b_sh), out_shardings=replicated)
    return StepFns(train=train, eval=evaluate, shardings=shardings, batch_sharding=b_sh)


def init_state(params: Any, tx: optax.GradientTransformation, mask: Any) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(trainable_view(params, mask))}


def abstract_state(model_config: ModelConfig, tx: optax.GradientTransformation, mask_fn: Callable[[Any], Any],
                   init_params_fn: Callable[[jax.Array], Any]) -> tuple[State, Any]:
    """Shapes of the train state (no memory), and the trainable mask computed on the param shapes."""
    shapes = jax.eval_shape(init_params_fn, jax.random.key(0))
    mask = mask_fn(shapes)
    return jax.eval_shape(lambda p: init_state(p, tx, mask), shapes), mask


def put_batch(batch: dict[str, Any], sharding: NamedSharding) -> Batch:
    """This process's rows [B/processes, T] -> global arrays [B, T] sharded over the batch axes."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a batch source yields {', '.join(BATCH_KEYS)} (each [B, T])")
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
