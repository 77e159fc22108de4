"""The real (non-interpret) kernels lower for their hardware without it:
- GPU: every Triton kernel lowers through jax.export for platforms=["cuda"] (Pallas -> Triton IR happens at
  lowering; PTX generation is left to XLA on the GPU).
- TPU: every Mosaic kernel is compiled ahead of time for a TPU topology through libtpu (skipped without it).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.int4_matmul import Int4Weight, int4_matmul
from kernels_pallas.paged_attention import paged_attention

TRITON = "__gpu$xla.gpu.triton"


def _flash_loss(backend, window=None):
    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, segment_ids=seg, sliding_window=window, backend=backend, interpret=False)
        return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _flash_args(S, dtype=jnp.bfloat16, T=1000, G=4, H=128, segments=True):
    return (S((1, T, 2, G, H), dtype), S((1, T, 2, H), dtype), S((1, T, 2, H), dtype),
            S((1, T), jnp.int32) if segments else None)


def _paged(backend, ppb, splits):
    def f(q, kp, vp, table, lengths, qpos, ks, vs, layer):
        return paged_attention(q, kp, vp, table, lengths, q_positions=qpos, k_scales=ks, v_scales=vs, layer=layer,
                               pages_per_block=ppb, num_splits=splits, backend=backend, interpret=False)
    return f


def _paged_args(S, int8, T=1, B=4, K=8, G=4, H=128, P=256, ps=64, M=32, L=4):
    """int8: the stacked [L, ...] pools read at a traced layer index; else one layer's pool."""
    if int8:
        scales = [S((L, P, ps, K), jnp.float32)] * 2
        pools = [S((L, P, ps, K, H), jnp.int8)] * 2
        layer = S((), jnp.int32)
    else:
        scales, pools, layer = [None, None], [S((P, ps, K, H), jnp.bfloat16)] * 2, None
    return (S((B, T, K, G, H), jnp.bfloat16), *pools, S((B, M), jnp.int32), S((B,), jnp.int32),
            S((B, T), jnp.int32), *scales, layer)


def _int4(backend):
    return lambda x, w: int4_matmul(x, w, backend=backend, interpret=False)


def _int4_args(S, m, symmetric, din=4096, dout=4096, g=128):
    w = Int4Weight(packed=S((din // 2, dout), jnp.uint8), scales=S((din // g, dout), jnp.float32),
                   zeros=None if symmetric else S((din // g, dout), jnp.float32), group_size=g,
                   in_shape=(din,), out_shape=(dout,))
    return S((m, din), jnp.bfloat16), w


# ---------------------------------------------------------------------------------------------- GPU
def _gpu_S(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _export_cuda(f, *args) -> str:
    exported = jax.export.export(jax.jit(f), platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("segments,window", [(True, None), (False, 257)])
def test_gpu_flash_attention_forward_and_backward_lower(segments, window):
    text = _export_cuda(_flash_loss("gpu", window), *_flash_args(_gpu_S, segments=segments))
    assert text.count(TRITON) == 3  # forward (with residuals), dQ, dK/dV


@pytest.mark.parametrize("int8", [False, True])
def test_gpu_paged_attention_lowers(int8):
    text = _export_cuda(_paged("gpu", 4, 2), *_paged_args(_gpu_S, int8))
    assert text.count(TRITON) == 1


@pytest.mark.parametrize("m,symmetric", [(8, True), (512, False)])
def test_gpu_int4_matmul_lowers(m, symmetric):
    text = _export_cuda(_int4("gpu"), *_int4_args(_gpu_S, m, symmetric))
    assert text.count(TRITON) == 1


# ---------------------------------------------------------------------------------------------- TPU
@pytest.fixture(scope="module", params=["v5p:2x2x1"])
def tpu_S(request):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu not installed: pip install -e .[tpu]")
    # Other processes (e.g. a concurrent AOT plan) may hold libtpu's lockfile; compiling needs no exclusive TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    name = request.param
    bounds = tuple(int(x) for x in name.split(":")[1].split("x")) + (1,) * (4 - len(name.split(":")[1].split("x")))
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                        chips_per_host_bounds=bounds[:3], num_slices=1)
    sharding = SingleDeviceSharding(topo.devices[0])
    return lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _compile_tpu(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    assert compiled.memory_analysis() is not None
    return compiled


@pytest.mark.parametrize("segments,window", [(True, None), (False, 257)])
def test_tpu_flash_attention_forward_and_backward_compile(tpu_S, segments, window):
    _compile_tpu(_flash_loss("tpu", window), *_flash_args(tpu_S, segments=segments))


def test_tpu_flash_attention_small_head_dims_and_fp32_compile(tpu_S):
    _compile_tpu(_flash_loss("tpu"), *_flash_args(tpu_S, jnp.float32, T=300, G=2, H=64))
    _compile_tpu(_flash_loss("tpu"), *_flash_args(tpu_S, jnp.bfloat16, T=64, G=1, H=32, segments=False))


@pytest.mark.parametrize("int8", [False, True])
def test_tpu_paged_attention_compiles(tpu_S, int8):
    _compile_tpu(_paged("tpu", 4, 2), *_paged_args(tpu_S, int8))


@pytest.mark.parametrize("m,symmetric", [(8, True), (512, False)])
def test_tpu_int4_matmul_compiles(tpu_S, m, symmetric):
    _compile_tpu(_int4("tpu"), *_int4_args(tpu_S, m, symmetric))
