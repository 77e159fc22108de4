"""One device equals an 8-device mesh (fsdp=4, tensor=2): params streamed from an HF folder straight into their
named shardings, the forward pass under that mesh, and export / orbax restore from sharded params."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from internlm_jax.checkpoint import load_hf, restore_params, save_hf, save_params
from internlm_jax.config import get_preset
from internlm_jax.model import forward, init_params, param_axes
from internlm_jax.sharding import MeshConfig, make_mesh, named_sharding, use_mesh

TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    assert jax.device_count() >= 8, "tests/conftest.py must give 8 simulated CPU devices before jax starts"
    config = get_preset("internlm2-tiny")  # K=2 kv heads over tensor=2, D=64 over fsdp=4
    folder = tmp_path_factory.mktemp("shard") / "hf"
    save_hf(folder, jax.jit(init_params, static_argnums=0)(config, jax.random.key(0)), config, progress=False)
    _, single = load_hf(folder, progress=False)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices=jax.devices()[:8])
    _, sharded = load_hf(folder, mesh=mesh, progress=False)
    return config, folder, mesh, single, sharded


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def test_loaded_params_sit_in_their_named_shardings(setup):
    config, _, mesh, single, sharded = setup
    axes = param_axes(config)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    for (path, x), names in zip(_leaves(sharded), flat_axes):
        assert x.sharding == named_sharding(mesh, names, x.shape), path
    wqkv = sharded["layers"]["wqkv"]
    assert tuple(wqkv.sharding.spec)[:3] == (None, "fsdp", "tensor")
    assert len(wqkv.addressable_shards) == 8 and wqkv.addressable_shards[0].data.shape == (2, 16, 1, 4, 16)
    for (path, a), (_, b) in zip(_leaves(single), _leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_forward_on_mesh_equals_one_device(setup):
    config, _, mesh, single, sharded = setup
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 16)).astype(np.int32)
    one, _ = jax.jit(lambda p, t: forward(p, t, config=config))(single, tokens)
    with use_mesh(mesh):
        tok = jax.device_put(tokens, named_sharding(mesh, ("batch", "length")))
        eight, _ = jax.jit(lambda p, t: forward(p, t, config=config))(sharded, tok)
    assert len(eight.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(eight), np.asarray(one), atol=TOL, rtol=0)


def test_export_and_orbax_from_sharded_params(setup, tmp_path):
    config, _, mesh, single, sharded = setup
    save_hf(tmp_path / "hf", sharded, config, progress=False)  # gathers one layer at a time
    _, again = load_hf(tmp_path / "hf", progress=False)
    save_params(tmp_path / "ckpt", sharded, config)
    _, restored = restore_params(tmp_path / "ckpt", mesh=mesh)
    for (path, a), (_, b), (_, c) in zip(_leaves(single), _leaves(again), _leaves(restored)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(path))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a), err_msg=str(path))
    assert restored["layers"]["w1"].sharding == sharded["layers"]["w1"].sharding
