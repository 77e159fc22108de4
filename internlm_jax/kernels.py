"""Model- and engine-side entry points to the Pallas kernels in `kernels_pallas/`.

Pallas is imported lazily (inside the functions), so importing the model never pulls it in. Every helper
takes `impl` = "auto" | "reference" | "pallas": auto picks the kernel on TPU/GPU and the pure-JAX reference on
CPU; "pallas" on CPU runs the kernel in the Pallas interpreter (slow; for tests).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IMPLS = ("auto", "reference", "pallas")


# Ahead-of-time compilation for another platform (e.g. `internlm-jax plan` for a TPU topology on a CPU host):
# within `aot_target("tpu")` kernels are chosen and lowered for that platform, never interpreted.
_AOT_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("ij_aot_target", default=None)


@contextlib.contextmanager
def aot_target(platform: str) -> Iterator[None]:
    if platform not in ("tpu", "gpu"):
        raise ValueError(f"aot_target platform must be 'tpu' or 'gpu', got {platform!r}")
    token = _AOT_TARGET.set(platform)
    try:
        yield
    finally:
        _AOT_TARGET.reset(token)


def _target_kwargs() -> dict[str, Any]:
    target = _AOT_TARGET.get()
    return {} if target is None else {"backend": target, "interpret": False}


def on_accelerator() -> bool:
    return _AOT_TARGET.get() is not None or jax.default_backend() in ("tpu", "gpu", "cuda")


def resolve_impl(impl: str) -> str:
    """'auto' -> 'pallas' on TPU/GPU, 'reference' elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {'|'.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "pallas" if on_accelerator() else "reference"
    return impl


def _per_shard(fn, args: tuple, names: tuple, out_names: tuple):
    """Run fn on each device's shard under the active mesh (sharding.use_mesh), else directly.

    A pallas_call is opaque to XLA's partitioner, which would otherwise gather its inputs onto every device;
    shard_map hands each device its own batch rows and kv heads instead (attention needs no communication
    along those axes). names: logical axis names per argument (None entries for replicated dims / args)."""
    from internlm_jax.sharding import _ACTIVE, named_sharding

    cur = _ACTIVE.get()  # (mesh, rules) set by sharding.use_mesh
    if cur is None:
        return fn(*args)
    mesh, rules = cur
    specs = tuple(None if a is None else named_sharding(mesh, n, a.shape, rules).spec for a, n in zip(args, names))
    out_spec = named_sharding(mesh, out_names, args[0].shape, rules).spec
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)


def flash_attention_dispatch(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
                             segment_ids: Int[Array, "B T"] | None, *, sliding_window: int | None = None,
                             impl: str = "pallas") -> Float[Array, "B T K G H"]:
    """Causal GQA self-attention for the model's training/eval path (no cache): the flash kernel (interpreted
    on CPU), or with impl='reference' the kernel module's pure-JAX reference. Under an active mesh the kernel
    runs per shard (batch over the data axes, kv heads over tensor)."""
    from kernels_pallas.flash_attention import flash_attention, flash_attention_reference

    fn = flash_attention if resolve_impl(impl) == "pallas" else flash_attention_reference

    def attend(q, k, v, seg):
        extra = _target_kwargs() if fn is flash_attention else {}
        return fn(q, k, v, segment_ids=seg, causal=True, sliding_window=sliding_window, **extra)

    qn = ("batch", None, "act_kv_heads", None, None)
    kn = ("batch", None, "act_kv_heads", None)
    return _per_shard(attend, (q, k, v, segment_ids), (qn, kn, kn, ("batch", None)), qn)


def paged_attention_dispatch(q: Float[Array, "B T K G H"], k_pages: Array, v_pages: Array,
                             page_table: Int[Array, "B M"], lengths: Int[Array, " B"],
                             q_positions: Int[Array, "B T"], k_scales: Array | None = None,
                             v_scales: Array | None = None, *, layer: Array | int | None = None,
                             impl: str = "auto", **kernel_options: Any) -> Float[Array, "B T K G H"]:
    """Decode / chunked-prefill attention over one layer's page pool [P, page_size, K, H] (int8 with scales
    [P, page_size, K] for int8 KV), or with `layer` over the stacked pools [L, P, page_size, K, H] read in
    place (no per-layer copy inside a scan). kernel_options: pages_per_block, num_splits, backend, interpret."""
    from kernels_pallas.paged_attention import paged_attention, paged_attention_reference

    fn = paged_attention if resolve_impl(impl) == "pallas" else paged_attention_reference

    def attend(q, kp, vp, table, lengths, qpos, ks, vs, lay):
        return fn(q, kp, vp, table, lengths, q_positions=qpos, k_scales=ks, v_scales=vs, layer=lay,
                  **kernel_options)

    stack = () if layer is None else (None,)
    qn = ("batch", None, "act_kv_heads", None, None)
    pn = (*stack, None, None, "act_kv_heads", None)  # the pool is shared by every sequence: heads split only
    sn = (*stack, None, None, "act_kv_heads")
    lay = None if layer is None else jnp.asarray(layer, jnp.int32)
    args = (q, k_pages, v_pages, page_table, lengths, q_positions, k_scales, v_scales, lay)
    names = (qn, pn, pn, ("batch", None), ("batch",), ("batch", None), sn, sn, ())
    return _per_shard(attend, args, names, qn)


def int4_matmul_dispatch(x: Float[Array, "M Din"], w: Any, *, impl: str = "auto",
                         **kernel_options: Any) -> Float[Array, "M Dout"]:
    """x @ W for an `kernels_pallas.int4_matmul.Int4Weight`. kernel_options: block_sizes, backend, interpret."""
    from kernels_pallas.int4_matmul import int4_matmul, int4_matmul_reference

    if resolve_impl(impl) == "pallas":
        return int4_matmul(x, w, **kernel_options)
    return int4_matmul_reference(x, w)


def int4_linear(x: Array, w: Any, *, impl: str = "auto") -> Array:
    """x[..., *in_shape] @ W -> [..., *out_shape] for an Int4Weight (any number of leading dims)."""
    lead = x.shape[: x.ndim - len(w.in_shape)]
    y = int4_matmul_dispatch(x.reshape(-1, w.shape[0]), w, impl=impl)
    return y.reshape(*lead, *w.out_shape)
