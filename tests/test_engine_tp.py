"""Tensor parallelism: the engine with params and page pool sharded over a `tensor` axis of 2 and 4
simulated devices (tests/conftest.py forces 8 CPU devices) gives the 1-device results."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from internlm_jax.config import get_preset
from internlm_jax.engine import Engine, EngineConfig, SamplingParams
from internlm_jax.engine.reference import greedy_uncached
from internlm_jax.model import init_params
from internlm_jax.sharding import MeshConfig, make_mesh

CFG = get_preset("internlm2-tiny")
MAX_LEN = 64


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_device(params, tp):
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = make_mesh(MeshConfig(data=1, tensor=tp), devices=jax.devices()[:tp])
    ec = EngineConfig(page_size=4, num_pages=48, max_num_seqs=4, max_model_len=MAX_LEN, max_num_batched_tokens=24,
                      chunk_size=16, max_prefill_rows=2, decode_batch_buckets=(4,), prefill_batch_buckets=(2,),
                      chunk_buckets=(16,), width_buckets=(MAX_LEN // 4,))
    eng = Engine(params, CFG, ec, mesh=mesh)
    pool = eng.runner.state.k
    # K=2 kv heads split over tensor=2; over tensor=4 they cannot split and are replicated (MLP/vocab still split)
    assert pool.sharding.spec[3] == ("tensor" if tp == 2 else None)
    assert eng.runner.params["layers"]["w1"].sharding.spec[2] == "tensor"
    rng = np.random.default_rng(tp)
    prompts = [[int(t) for t in rng.integers(3, CFG.vocab_size, int(rng.integers(3, 40)))] for _ in range(6)]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    outs = eng.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in outs] == greedy_uncached(params, CFG, prompts, 10, pad_to=MAX_LEN)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    one = Engine(params, CFG, ec)
    assert ([o.outputs[0].token_ids for o in eng.generate(prompts, seeded)]
            == [o.outputs[0].token_ids for o in one.generate(prompts, seeded)])
    assert eng.stats()["compilations"] == 0 and eng.stats()["pages_used"] == 0
