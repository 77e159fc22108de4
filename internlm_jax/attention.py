"""The one place that picks the attention backend, for each kind of cache the model runs with.

    self_attention    no cache (training, eval, uncached logits): sequence-parallel blockwise attention when
                      the mesh has a `sequence` axis > 1, else the flash kernel (Pallas) or the reference.
    cached_attention  a dense cache (keys by position): the reference.
    paged_attention   a paged cache: the Pallas paged kernel or its pure-JAX reference, both through the
                      shard-aware dispatch, so under a mesh each device attends over its own kv heads of the
                      pool (no all-gather of the pool).

`config.attention_impl`: "auto" = the kernels on TPU/GPU (or an AOT target), the reference elsewhere;
"reference"; "pallas" forces the kernels (interpret mode on CPU, for tests).
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, Int

from internlm_jax.config import ModelConfig
from internlm_jax.layers import attention_mask, reference_attention
from internlm_jax.sharding import active_mesh

# The paged kernel is for decode-sized query blocks; under "auto" longer prefill chunks use the reference.
PAGED_KERNEL_MAX_T = 16


def _impl(config: ModelConfig) -> str:
    from internlm_jax.kernels import resolve_impl

    return resolve_impl(config.attention_impl)


def self_attention(q: Float[Array, "B T K G H"], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
                   positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None,
                   config: ModelConfig) -> Float[Array, "B T K G H"]:
    """Causal (by index) attention of a block over itself, within equal segment ids."""
    mesh = active_mesh()
    if mesh is not None and mesh.shape.get("sequence", 1) > 1:
        # Long context: the sequence is sharded; all-gather K/V and attend blockwise (causal by position and
        # segment, so a zigzag-permuted sequence is fine).
        from internlm_jax.seq_parallel import sequence_parallel_attention

        return sequence_parallel_attention(q, k, v, positions, segment_ids, mesh=mesh)
    if _impl(config) == "pallas":
        from internlm_jax.kernels import flash_attention_dispatch

        return flash_attention_dispatch(q, k, v, segment_ids)
    mask = attention_mask(positions, positions, segment_ids, segment_ids, by_position=False)
    return reference_attention(q, k, v, mask)


def cached_attention(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
                     q_positions: Int[Array, "B T"], k_positions: Int[Array, "B S"]) -> Float[Array, "B T K G H"]:
    """Queries against a dense cache: a key is seen when its position is set (>= 0) and <= the query's."""
    mask = attention_mask(q_positions, k_positions, None, None, by_position=True)
    return reference_attention(q, k, v, mask)


def paged_attention(q: Float[Array, "B T K G H"], k_pool: jax.Array, v_pool: jax.Array,
                    page_table: Int[Array, "B W"], lengths: Int[Array, "B"], q_positions: Int[Array, "B T"],
                    layer: Int[Array, ""] | int, k_scale_pool: jax.Array | None, v_scale_pool: jax.Array | None,
                    config: ModelConfig) -> Float[Array, "B T K G H"]:
    """Queries against layer `layer` of the stacked page pools [L, P, S, K, H], read in place."""
    from internlm_jax.kernels import paged_attention_dispatch

    impl = _impl(config)
    if impl == "pallas" and config.attention_impl == "auto" and q.shape[1] > PAGED_KERNEL_MAX_T:
        impl = "reference"
    return paged_attention_dispatch(q, k_pool, v_pool, page_table, lengths, q_positions, k_scale_pool,
                                    v_scale_pool, layer=layer, impl=impl)


__all__ = ["PAGED_KERNEL_MAX_T", "cached_attention", "paged_attention", "self_attention"]
