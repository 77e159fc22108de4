"""Causal grouped-query flash attention (forward and backward) for TPU (Mosaic) and GPU (Triton), with a
pure-JAX reference beside it.

    out = flash_attention(q [B, T, K, G, H], k [B, S, K, H], v [B, S, K, H], segment_ids=[B, T] | None)

Query i is at key index i + (S - T) (T == S for training). Key j is visible to query i when
  causal:          j <= i + (S - T)
  sliding_window:  i + (S - T) - j < sliding_window   (needs causal)
  segment_ids:     segment_ids[i] == segment_ids[j]    (packed documents; needs T == S)
Numerics: scores q.k * sm_scale, online softmax and accumulation in fp32, probabilities cast to v's dtype for
the P.V product (as the reference does); the forward saves the logsumexp and the backward (dQ, dK, dV Pallas
kernels via custom_vjp) recomputes probabilities from it. Lengths that are not block multiples are padded
internally and the padding masked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas import _flash_gpu, _flash_tpu
from kernels_pallas._common import (
    MASK_VALUE,
    check_dtype,
    next_pow2,
    pad_axis,
    resolve_backend,
    resolve_interpret,
    round_up,
)
from kernels_pallas._flash_common import FlashConfig

_DTYPES = ("float32", "bfloat16", "float16")
_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Forward: block_q x block_k; dK/dV and dQ kernels have their own (default: the forward's).

    All are powers of two (so the padded length is a multiple of the largest); TPU: block_q* >= 16 (bf16
    sublane packing), block_k* >= 128 (lanes); GPU: >= 16 (Triton tiles). Blocks longer than the sequence
    (rounded up to a power of two) are shrunk to it.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if val is None:
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {val!r}")

    @classmethod
    def get_default(cls, backend: str, groups: int = 1) -> BlockSizes:
        """Untuned starting points. On TPU the G query heads of a group share a tile of G * block_q rows, so
        block_q shrinks with G to keep the fp32 score tile (rows x block_k) within a few MiB of VMEM."""
        if resolve_backend(backend) == "tpu":
            def rows(budget: int) -> int:
                return max(16, min(512, 1 << (max(1, budget // groups).bit_length() - 1)))
            return cls(block_q=rows(1024), block_k=512, block_q_dkv=rows(512), block_k_dkv=256,
                       block_q_dq=rows(512), block_k_dq=512)
        return cls(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64)

    def _all(self) -> dict[str, int]:
        return {"block_q": self.block_q, "block_k": self.block_k,
                "block_q_dkv": self.block_q_dkv or self.block_q, "block_k_dkv": self.block_k_dkv or self.block_k,
                "block_q_dq": self.block_q_dq or self.block_q, "block_k_dq": self.block_k_dq or self.block_k}

    @staticmethod
    def _minimum(backend: str, name: str) -> int:
        return 128 if backend == "tpu" and name.startswith("block_k") else 16

    def validate(self, backend: str) -> None:
        for name, val in self._all().items():
            lo = self._minimum(backend, name)
            if val < lo or val & (val - 1):
                raise ValueError(f"BlockSizes.{name}={val} must be a power of two >= {lo} for the "
                                 f"{backend.upper()} kernels")

    def resolve(self, backend: str, T: int, S: int) -> tuple[dict[str, int], int, int]:
        """Blocks shrunk to the sequence, and the padded lengths (Tp, Sp): multiples of the largest block."""
        self.validate(backend)
        out = {}
        for name, val in self._all().items():
            n = T if name.startswith("block_q") else S
            out[name] = min(val, max(self._minimum(backend, name), next_pow2(n)))
        q_mult = max(v for n, v in out.items() if n.startswith("block_q"))
        k_mult = max(v for n, v in out.items() if n.startswith("block_k"))
        return out, round_up(T, q_mult), round_up(S, k_mult)


def _validate(q, k, v, segment_ids, causal, sliding_window):
    if q.ndim != 5:
        raise ValueError(f"q must be [B, T, K, G, H], got shape {q.shape}")
    if k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"k and v must be [B, S, K, H], got shapes {k.shape} and {v.shape}")
    B, T, K, _G, H = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if k.shape[0] != B or k.shape[2] != K or k.shape[3] != H:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape}: expected [B={B}, S, K={K}, H={H}]")
    S = k.shape[1]
    if T > S:
        raise ValueError(f"query length T={T} exceeds key length S={S}; queries are the last T keys")
    if H not in _HEAD_DIMS:
        raise ValueError(f"head dim {H} is not supported; use one of {_HEAD_DIMS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, x, _DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be integers, got {segment_ids.dtype}")
        if T != S:
            raise ValueError("segment_ids need self-attention (T == S); got T={T}, S={S}")
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window needs causal=True")
        if not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg: FlashConfig):
    return _impl(cfg).forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _impl(cfg: FlashConfig):
    return _flash_tpu if cfg.backend == "tpu" else _flash_gpu


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
    o, lse = _impl(cfg).forward(q, k, v, q_seg, kv_seg, cfg)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    impl = _impl(cfg)
    # delta_i = sum_h O_ih dO_ih = sum_j P_ij dP_ij: the softmax-Jacobian term, in fp32.
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if cfg.backend == "tpu":
        di = di[..., None]  # [B, K, G, Tp, 1] like lse
    else:
        di = jnp.moveaxis(di, 1, -1)  # [B, Tp, K, G] -> [B, K, G, Tp]
    dq = impl.backward_dq(q, k, v, q_seg, kv_seg, do, lse, di, cfg)
    dk, dv = impl.backward_dkv(q, k, v, q_seg, kv_seg, do, lse, di, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "sliding_window", "block_sizes", "backend",
                                             "interpret"))
def flash_attention(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"], *,
                    segment_ids: Int[Array, "B T"] | None = None, causal: bool = True,
                    sm_scale: float | None = None, sliding_window: int | None = None,
                    block_sizes: BlockSizes | None = None, backend: str = "auto",
                    interpret: bool | None = None) -> Float[Array, "B T K G H"]:
    """Flash attention with grouped-query heads; differentiable (Pallas backward kernels).

    backend: "tpu" (Mosaic), "gpu" (Triton) or "auto" (the default device's; the TPU kernels on CPU).
    interpret: run the kernels in the Pallas interpreter; None = exactly when the device is not the backend's.
    """
    _validate(q, k, v, segment_ids, causal, sliding_window)
    be = resolve_backend(backend)
    interp = resolve_interpret(interpret, be)
    _B, T, _K, G, H = q.shape
    S = k.shape[1]
    blocks, Tp, Sp = (block_sizes or BlockSizes.get_default(be, G)).resolve(be, T, S)
    cfg = FlashConfig(backend=be, interpret=interp, causal=causal,
                      sm_scale=float(H ** -0.5 if sm_scale is None else sm_scale), window=sliding_window,
                      offset=S - T, kv_len=S, q_len=T, groups=G, has_segments=segment_ids is not None,
                      padded_q=Tp, padded_k=Sp, num_warps=4 if H <= 64 else 8, **blocks)
    qp, kp, vp = pad_axis(q, 1, Tp), pad_axis(k, 1, Sp), pad_axis(v, 1, Sp)
    q_seg = kv_seg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        q_seg, kv_seg = pad_axis(seg, 1, Tp, -1), pad_axis(seg, 1, Sp, -1)
    if be == "tpu":
        qp = jnp.transpose(qp, (0, 2, 3, 1, 4))  # [B, K, G, Tp, H]: query rows on sublanes
        kp, vp = jnp.transpose(kp, (0, 2, 1, 3)), jnp.transpose(vp, (0, 2, 1, 3))  # [B, K, Sp, H]
        if q_seg is not None:
            q_seg, kv_seg = q_seg[:, :, None], kv_seg[:, None, :]
        out = jnp.transpose(_flash(qp, kp, vp, q_seg, kv_seg, cfg), (0, 3, 1, 2, 4))
    else:
        out = _flash(qp, kp, vp, q_seg, kv_seg, cfg)
    return out[:, :T]


def attention_mask(T: int, S: int, segment_ids: jax.Array | None, causal: bool,
                   sliding_window: int | None) -> jax.Array:
    """[B or 1, T, S] bool visibility, the definition both the kernels and the reference follow."""
    q_abs = jnp.arange(T)[:, None] + (S - T)
    kj = jnp.arange(S)[None, :]
    mask = jnp.ones((T, S), bool)
    if causal:
        mask &= kj <= q_abs
    if sliding_window is not None:
        mask &= q_abs - kj < sliding_window
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "sliding_window", "block_sizes", "backend",
                                             "interpret"))
def flash_attention_reference(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"],
                              v: Float[Array, "B S K H"], *, segment_ids: Int[Array, "B T"] | None = None,
                              causal: bool = True, sm_scale: float | None = None,
                              sliding_window: int | None = None, block_sizes: BlockSizes | None = None,
                              backend: str = "auto", interpret: bool | None = None) -> Float[Array, "B T K G H"]:
    """Plain-XLA attention with the same signature and semantics (block_sizes/backend/interpret ignored)."""
    del block_sizes, backend, interpret
    _validate(q, k, v, segment_ids, causal, sliding_window)
    T, H, S = q.shape[1], q.shape[-1], k.shape[1]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    mask = attention_mask(T, S, segment_ids, causal, sliding_window)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
