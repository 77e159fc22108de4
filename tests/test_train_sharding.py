"""8 simulated devices, mesh (data=2, fsdp=2, tensor=2): the same losses as 1 device, and every param and
optimizer leaf sharded the way the rules table says (printed, then checked against a hand-written table)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from internlm_jax.config import get_preset
from internlm_jax.model import init_params, param_axes
from internlm_jax.sharding import MeshConfig, make_mesh
from internlm_jax.train.config import OptimizerConfig
from internlm_jax.train.optimizer import build_optimizer, trainable_mask
from internlm_jax.train.step import abstract_state, init_state, make_step_fns, put_batch
from internlm_jax.train.synthetic import SyntheticBatches

CFG = get_preset("internlm2-tiny")  # V=1024 D=64 L=2 N=4 K=2 G=2 H=16 F=128
STEPS = 4

# What DEFAULT_RULES give each leaf on (data=2, fsdp=2, tensor=2): embed->fsdp, vocab/mlp/kv_heads->tensor.
EXPECTED = {
    "['embed']": P("tensor", "fsdp"),
    "['layers']['attention_norm']": P(None, None),
    "['layers']['ffn_norm']": P(None, None),
    "['layers']['wqkv']": P(None, "fsdp", "tensor", None, None),
    "['layers']['wo']": P(None, "tensor", None, None, "fsdp"),
    "['layers']['w1']": P(None, "fsdp", "tensor"),
    "['layers']['w3']": P(None, "fsdp", "tensor"),
    "['layers']['w2']": P(None, "tensor", "fsdp"),
    "['norm']": P(None),
    "['output']": P("fsdp", "tensor"),
}


def _norm(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _run(devices, mesh_cfg):
    mesh = make_mesh(mesh_cfg, devices)
    tx, schedule = build_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=1, weight_decay=0.1), STEPS)
    init = lambda k: init_params(CFG, k)
    abstract, mask = abstract_state(CFG, tx, lambda p: trainable_mask(p, None), init)
    fns = make_step_fns(CFG, tx, schedule, mesh, abstract, param_axes(CFG), mask, grad_accum=2)
    state = jax.jit(lambda k: init_state(init(k), tx, mask), out_shardings=fns.shardings)(jax.random.key(0))
    source = SyntheticBatches(CFG.vocab_size, 32, 8, seed=1)
    losses = []
    for _ in range(STEPS):
        batch = put_batch(next(source), fns.batch_sharding)
        state, metrics = fns.train(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses, batch


@pytest.fixture(scope="module")
def runs():
    one = _run(jax.devices()[:1], MeshConfig())
    eight = _run(jax.devices()[:8], MeshConfig(data=2, fsdp=2, tensor=2))
    return one, eight


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_eight_devices_match_one(runs):
    (s1, l1, _), (s8, l8, _) = runs
    print("losses 1 device :", l1)
    print("losses 8 devices:", l8)
    assert l1[-1] < l1[0]  # it trains
    # Same math; only the order of float reductions differs across shards.
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s1["params"])[0], jax.tree.leaves(s8["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_param_and_optimizer_shardings_follow_rules(runs):
    _, (state, _, batch) = runs
    assert len(jax.devices()) >= 8
    params = state["params"]
    print(f"{'leaf':<36} {'shape':<22} {'spec':<40} shard")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        shard = leaf.addressable_shards[0].data.shape
        print(f"{name:<36} {leaf.shape!s:<22} {leaf.sharding.spec!s:<40} {shard}")
        assert _norm(leaf.sharding.spec, leaf.ndim) == _norm(EXPECTED[name], leaf.ndim), name
        # Each mesh axis named in the spec divides that dimension: the shard is that much smaller.
        sizes = {"data": 2, "fsdp": 2, "tensor": 2}
        want = tuple(d // (sizes[a] if a else 1) for d, a in zip(leaf.shape, _norm(EXPECTED[name], leaf.ndim)))
        assert shard == want, (name, shard, want)
    assert set(EXPECTED) == {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}

    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moment in ("mu", "nu"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(adam[0], moment))[0]:
            name = jax.tree_util.keystr(path)
            print(f"opt {moment}{name:<32} {leaf.sharding.spec!s}")
            assert _norm(leaf.sharding.spec, leaf.ndim) == _norm(EXPECTED[name], leaf.ndim), (moment, name)
    # Scalars (step counts) are replicated; nothing in the optimizer state is left unsharded by accident.
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        if leaf.ndim == 0:
            assert leaf.sharding.spec == P(), jax.tree_util.keystr(path)
    assert state["step"].sharding.spec == P()
    # The batch rows are split over data x fsdp (4 ways), replicated over tensor.
    tokens = batch["tokens"]
    assert tokens.sharding.spec == P(("data", "fsdp"), "sequence")
    assert tokens.addressable_shards[0].data.shape == (2, 32)
