"""Helpers shared by the Pallas kernels: backend choice, interpret mode, padding, masking constants."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Backend = Literal["tpu", "gpu"]

# Large negative instead of -inf (same constant as internlm_jax.layers): a block whose scores are all masked
# keeps finite running statistics, and exp(MASK_VALUE - m) underflows to exactly 0 once any real score is seen.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# TPU vector registers are (8 sublanes x 128 lanes) of 32-bit values.
TPU_LANES = 128
TPU_SUBLANES = 8


def resolve_backend(backend: str) -> Backend:
    """'auto' -> the kernel family of the default device; on CPU the TPU family (run in interpret mode)."""
    if backend == "auto":
        platform = jax.default_backend()
        return "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"backend must be 'auto', 'tpu' or 'gpu', got {backend!r}")
    return backend  # type: ignore[return-value]


def resolve_interpret(interpret: bool | None, backend: Backend) -> bool:
    """None -> interpret exactly when the default device cannot run `backend`'s kernels natively.

    An explicit False is kept even on CPU: that is how kernels are lowered ahead of time for another platform
    (jax.export for CUDA, AOT compilation for a TPU topology).
    """
    if interpret is None:
        native = {"tpu": ("tpu",), "gpu": ("gpu", "cuda")}[backend]
        return jax.default_backend() not in native
    return bool(interpret)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int, value: float = 0) -> jax.Array:
    """Pad `axis` at the end up to `size` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    if extra < 0:
        raise ValueError(f"cannot pad axis {axis} of shape {x.shape} down to {size}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def check_dtype(name: str, x: jax.Array, allowed: tuple[str, ...]) -> None:
    if jnp.dtype(x.dtype).name not in allowed:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {', '.join(allowed)}")


def check_power_of_two(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= {minimum} for the GPU (Triton) kernels")
