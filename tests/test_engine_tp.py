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


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
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


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_tp2_pallas_paged_kernel_reads_its_own_heads(params):
    """The paged kernel (interpret mode here) under tensor parallelism runs per shard: the compiled step gathers
    no attention data across devices (each device attends over its own kv heads of the pool; the only
    all-gathers left are the sampler's [B, V] logits and [B, n] reductions), and the tokens equal one device.
    Called on the whole pool without the shard-aware dispatch, the same step all-gathers K/V blocks."""
    import re

    cfg = CFG.replace(attention_impl="pallas")
    mesh = make_mesh(MeshConfig(data=1, tensor=2), devices=jax.devices()[:2])
    ec = EngineConfig(page_size=4, num_pages=24, max_num_seqs=2, max_model_len=32, max_num_batched_tokens=12,
                      chunk_size=8, max_prefill_rows=1, decode_batch_buckets=(2,), prefill_batch_buckets=(1,),
                      chunk_buckets=(8,), width_buckets=(8,))
    eng = Engine(params, cfg, ec, mesh=mesh)
    assert eng.runner._executables
    for key, exe in eng.runner._executables.items():
        gathered = [tuple(int(d) for d in m.group(1).split(",")) for m in
                    re.finditer(r"= \w+\[([\d,]+)\]\{[^}]*\} all-gather", exe.as_text())]
        assert gathered and all(len(g) <= 2 for g in gathered), (key, gathered)
    prompts = [[5, 9, 14, 3, 7, 22, 8, 11, 30], [4, 6]]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in eng.generate(prompts, sp)]
    assert got == greedy_uncached(params, CFG, prompts, 6, pad_to=32)
