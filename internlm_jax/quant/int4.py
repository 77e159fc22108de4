"""Int4 weight-only quantization of the model's linear layers: the `QuantizedLinear` weight type and
`quantize_params` (round-to-nearest, or AWQ-style activation-aware scaling via `internlm_jax.quant.awq`).

The packed format is `kernels_pallas.int4_matmul.Int4Weight` (group-wise along the input dim, half-split
nibbles, per-group scales and optional zero points). A model weight of shape [*in, *out] (wqkv [D, K, G+2, H],
wo [K, G, H, D], ...) is quantized as the flattened [prod(in), prod(out)] matrix; per-layer weights keep their
leading L axis on every leaf, so `lax.scan` over the layers hands each step one matrix.

Matmul implementation (`impl`, from `ModelConfig.matmul_impl` when quantizing; change it with
`set_matmul_impl`): "pallas" runs the int4 Pallas kernel (TPU / GPU), "reference" dequantizes the tile to the
compute dtype and runs one dense dot (CPU, or to check the kernel), "auto" picks the kernel when
`jax.default_backend()` is tpu or gpu. Both paths share one custom VJP whose backward pass is the dense op
dx = dy @ dequant(W)^T: int4 weights are frozen (zero cotangent), but gradients reach the activations, which
is what QLoRA needs; the forward residual is the packed weight only, never a dequantized copy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from internlm_jax.config import ConfigError, ModelConfig
from kernels_pallas.int4_matmul import (
    Int4Weight,
    dequantize_int4,
    int4_matmul,
    int4_matmul_reference,
    quantize_int4,
)

Params = dict[str, Any]
MatmulImpl = Literal["auto", "reference", "pallas"]

# Every linear weight of the model: its path in the params tree and its input / output dimension letters
# (the arguments model code passes to `layers.linear`).
LINEAR_AXES: dict[str, tuple[str, str]] = {
    "wqkv": ("D", "KQH"),
    "wo": ("KGH", "D"),
    "w1": ("D", "F"),
    "w3": ("D", "F"),
    "w2": ("F", "D"),
    "output": ("D", "V"),
}
LAYER_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
DEFAULT_TARGETS = LAYER_TARGETS
GROUP_SIZES = (32, 64, 128, 256)


def target_path(name: str) -> tuple[str, ...]:
    """Where a linear weight lives in the params tree."""
    return ("output",) if name == "output" else ("layers", name)


def check_targets(targets: Iterable[str], what: str = "targets") -> tuple[str, ...]:
    """Validate target names (a str is one name); returns them as a tuple, order kept, duplicates dropped."""
    if isinstance(targets, str):
        targets = (targets,)
    out = tuple(dict.fromkeys(targets))
    bad = [t for t in out if t not in LINEAR_AXES]
    if bad:
        raise ConfigError(f"unknown {what} {bad}: the linear layers of InternLM2 are "
                          f"{', '.join(LINEAR_AXES)} (layer weights {', '.join(LAYER_TARGETS)}, head 'output')")
    if not out:
        raise ConfigError(f"{what} is empty: name at least one of {', '.join(LINEAR_AXES)}")
    return out


def resolve_impl(impl: str) -> str:
    if impl not in ("auto", "reference", "pallas"):
        raise ConfigError(f"matmul impl must be auto|reference|pallas, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu", "cuda") else "reference"
    return impl


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def int4_dot(x: Float[Array, "M Din"], w: Int4Weight, impl: str) -> Float[Array, "M Dout"]:
    """x @ W for one packed matrix, in x's dtype with fp32 accumulation; differentiable in x only."""
    return int4_matmul(x, w) if impl == "pallas" else int4_matmul_reference(x, w)


def _int4_dot_fwd(x, w, impl):
    return int4_dot(x, w, impl), w


def _int4_dot_bwd(impl, w, dy):
    del impl
    # The dense backward op: the weight is dequantized in fp32, cast to the cotangent's dtype, fp32 accumulation.
    wd = dequantize_int4(w, jnp.float32).reshape(w.shape).astype(dy.dtype)
    dx = jnp.dot(dy, wd.T, preferred_element_type=jnp.float32).astype(dy.dtype)
    return dx, jax.tree.map(_zero_cotangent, w)


int4_dot.defvjp(_int4_dot_fwd, _int4_dot_bwd)


def _lead_ndim(w: Int4Weight) -> int:
    return w.packed.ndim - 2


def _map_lead(fn, w: Int4Weight, *rest):
    """Apply a one-matrix function over the leading (stacking) axes of an Int4Weight's leaves."""
    for _ in range(_lead_ndim(w)):
        fn = jax.vmap(fn)
    return fn(w, *rest)


@flax.struct.dataclass
class QuantizedLinear:
    """An int4 model weight: the packed [prod(in), prod(out)] matrix, optionally a per-input-channel
    activation scale (AWQ scales that could not be folded into a preceding op; x is multiplied by it before the
    matmul), and the matmul implementation. Leaves may carry leading axes (the stacked layer axis L)."""

    weight: Int4Weight
    input_scale: jax.Array | None = None  # [..., prod(in)] or None
    impl: str = flax.struct.field(pytree_node=False, default="auto")

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.weight.in_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.weight.out_shape

    @property
    def group_size(self) -> int:
        return self.weight.group_size

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.packed.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of the dense weight this stands for, leading axes included."""
        return self.lead_shape + self.in_shape + self.out_shape

    @property
    def nbytes(self) -> int:
        return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    def linear(self, x: Array, in_axes: str, out_axes: str, dtype: Any) -> Array:
        """layers.linear hook: x[..., *in] @ W -> [..., *out] in `dtype`."""
        nin = len(self.in_shape)
        if len(in_axes) != nin or len(out_axes) != len(self.out_shape):
            raise ValueError(f"QuantizedLinear with in_shape {self.in_shape} and out_shape {self.out_shape} "
                             f"used as {in_axes}->{out_axes}")
        if self.lead_shape:
            raise ValueError(f"QuantizedLinear holds a stack of {self.lead_shape} matrices; slice one layer "
                             "(lax.scan over params['layers'] does this) before calling linear")
        if tuple(x.shape[x.ndim - nin:]) != self.in_shape:
            raise ValueError(f"input of shape {x.shape} does not end in the weight's input dims {self.in_shape}")
        lead = x.shape[: x.ndim - nin]
        x2 = x.reshape(-1, self.weight.shape[0]).astype(dtype)
        if self.input_scale is not None:
            x2 = x2 * self.input_scale.astype(dtype)
        y = int4_dot(x2, self.weight, resolve_impl(self.impl))
        return y.reshape(*lead, *self.out_shape)

    def dequantize(self, dtype: Any = jnp.float32) -> Array:
        """The dense [*lead, *in, *out] weight (the input scale folded into its rows)."""
        w = _map_lead(lambda q: dequantize_int4(q, jnp.float32).reshape(q.shape), self.weight)
        if self.input_scale is not None:
            w = w * self.input_scale.astype(jnp.float32)[..., :, None]
        return w.reshape(self.shape).astype(dtype)

    def to_dense(self) -> Array:
        """For HF export (`checkpoint.hf.dense_weight`): the dequantized weight in the scales' dtype."""
        return self.dequantize(self.weight.scales.dtype)


def quantize_weight(w: Float[Array, "*lead_in_out"], in_ndim: int, *, lead_ndim: int = 0, group_size: int = 128,
                    zero_point: bool = True, impl: str = "auto", scale_dtype: Any = jnp.float32) -> QuantizedLinear:
    """Round-to-nearest int4 quantization of a dense weight [*lead, *in, *out] (in_ndim input dims)."""
    din = math.prod(w.shape[lead_ndim: lead_ndim + in_ndim])
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"group_size must be one of {GROUP_SIZES} (128 is the usual choice), got {group_size}")
    if din % group_size:
        raise ConfigError(f"a weight with input size {din} cannot be quantized in groups of {group_size}: "
                          f"choose a group_size that divides {din} (one of "
                          f"{[g for g in GROUP_SIZES if din % g == 0] or 'none: this weight cannot be int4'})")
    resolve_impl(impl)
    q = _quantize_many((w,), ((in_ndim, lead_ndim),), group_size, not zero_point, jnp.dtype(scale_dtype))[0]
    return QuantizedLinear(weight=q, impl=impl)


def _quantize_one(w, in_ndim, lead_ndim, group_size, symmetric, scale_dtype):
    fn = functools.partial(quantize_int4, group_size=group_size, symmetric=symmetric, in_ndim=in_ndim,
                           scale_dtype=scale_dtype)
    for _ in range(lead_ndim):
        fn = jax.vmap(fn)
    return fn(w)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_many(ws, specs, group_size, symmetric, scale_dtype):
    """Several weights in one program; specs[i] = (in_ndim, lead_ndim)."""
    return tuple(_quantize_one(w, i, l_, group_size, symmetric, scale_dtype) for w, (i, l_) in zip(ws, specs))


def quantize_params(params: Params, config: ModelConfig, *, group_size: int = 128,
                    method: Literal["rtn", "awq"] = "rtn", calib_batches: Any = None,
                    targets: Sequence[str] = DEFAULT_TARGETS, zero_point: bool = True, impl: str | None = None,
                    awq_grid: int = 20, awq_search_tokens: int = 4096, progress: bool = False,
                    return_info: bool = False) -> Params | tuple[Params, dict[str, Any]]:
    """A params tree whose `targets` linear weights are `QuantizedLinear` (int4, groups of `group_size` along
    the input dim, with zero points unless zero_point=False). Other leaves are kept as they are.

    method="rtn": round to nearest. method="awq": activation-aware scaling searched on `calib_batches`
    (token ids [N, T] or a list of equal-shape [B, T] arrays; see `internlm_jax.quant.awq`), folded into the
    preceding norms / projections, then round to nearest. `impl` overrides config.matmul_impl.
    With return_info, also returns {"method", "group_size", "zero_point", "targets", and for AWQ "alphas"
    (per target, one per layer) and "errors" (per target per layer: output MSE of RTN and of AWQ on the
    calibration activations)}.
    """
    targets = check_targets(targets)
    impl = impl if impl is not None else config.matmul_impl
    resolve_impl(impl)  # validates the name
    if method not in ("rtn", "awq"):
        raise ConfigError(f"quantization method must be 'rtn' or 'awq', got {method!r}")
    for name in targets:
        leaf = _get(params, target_path(name))
        if not _is_dense(leaf):
            raise ConfigError(f"params/{'/'.join(target_path(name))} is a {type(leaf).__name__}, not a dense "
                              "array: quantize the plain model (merge LoRA adapters first; int4 weights are "
                              "already quantized)")
    _check_group_size(config, targets, group_size)
    info: dict[str, Any] = {"method": method, "group_size": group_size, "zero_point": zero_point,
                            "targets": list(targets)}
    if method == "awq":
        if calib_batches is None:
            raise ConfigError("method='awq' needs calibration data: pass calib_batches (token ids [N, T])")
        from internlm_jax.quant.awq import awq_scale

        params, awq_info = awq_scale(params, config, calib_batches, targets=targets, group_size=group_size,
                                     zero_point=zero_point, n_grid=awq_grid, search_tokens=awq_search_tokens,
                                     progress=progress)
        info.update(awq_info)
    out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))  # copy the dicts
    # One compiled program quantizes every target (XLA compiles are the slow part on small models); with
    # progress, one call per target so the bar moves.
    paths = [target_path(name) for name in targets]
    specs = tuple((len(LINEAR_AXES[name][0]), 1 if p[0] == "layers" else 0) for name, p in zip(targets, paths))
    groups = [list(range(len(targets)))] if not progress else [[i] for i in range(len(targets))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(targets), desc="quantizing", unit="weight")
    for idx in groups:
        qs = _quantize_many(tuple(_get(params, paths[i]) for i in idx), tuple(specs[i] for i in idx), group_size,
                            not zero_point, jnp.dtype(jnp.float32))
        for i, q in zip(idx, qs):
            _set(out, paths[i], QuantizedLinear(weight=q, impl=impl))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return (out, info) if return_info else out


def _check_group_size(config: ModelConfig, targets: Sequence[str], group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"group_size must be one of {GROUP_SIZES} (128 is the usual choice), got {group_size}")
    sizes = {"D": config.hidden_size, "F": config.intermediate_size,
             "KGH": config.num_heads * config.head_dim}
    for name in targets:
        din = sizes[LINEAR_AXES[name][0]]
        if din % group_size:
            ok = [g for g in GROUP_SIZES if din % g == 0]
            raise ConfigError(f"{name} has input size {din}, which group_size {group_size} does not divide; use "
                              f"--group-size {max(ok) if ok else '?'} (valid here: {ok}) or leave {name} out of "
                              "the targets")


def set_matmul_impl(params: Params, impl: MatmulImpl) -> Params:
    """The same params with every QuantizedLinear using `impl` (auto | reference | pallas)."""
    resolve_impl(impl)
    return jax.tree.map(lambda x: x.replace(impl=impl) if isinstance(x, QuantizedLinear) else x, params,
                        is_leaf=lambda x: isinstance(x, QuantizedLinear))


def dequantize_params(params: Params, dtype: Any = None) -> Params:
    """Every QuantizedLinear replaced by its dense weight (in `dtype`, default the scales' dtype)."""
    def go(x):
        if isinstance(x, QuantizedLinear):
            return x.dequantize(dtype or x.weight.scales.dtype)
        return x
    return jax.tree.map(go, params, is_leaf=lambda x: isinstance(x, QuantizedLinear))


def params_nbytes(params: Any) -> int:
    """Bytes of every array leaf (works on ShapeDtypeStructs too)."""
    return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def _is_dense(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not hasattr(x, "linear"))


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    try:
        for k in path:
            tree = tree[k]
    except (KeyError, TypeError):
        raise ConfigError(f"params lack {'/'.join(path)}: expected the tree of internlm_jax.model.init_params") from None
    return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value
