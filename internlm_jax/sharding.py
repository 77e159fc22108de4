"""Meshes, logical-axis rules, and the sharding of params and activations.

Model code names axes logically (`embed`, `mlp`, `kv_heads`, ...). One table (`DEFAULT_RULES`) maps each
logical name to mesh axes (`data`, `fsdp`, `tensor`, `sequence`). A logical name missing from the table is
an error, never a silent replicate. Model code calls `constrain(x, names)`; outside `use_mesh(...)` it is a
no-op, so the same code runs on one CPU and on a pod.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internlm_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated on purpose).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_length": None,
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "kv_heads": "tensor",
    "qkv": None,  # the G+2 rows of one kv group in packed wqkv
    "q_group": None,  # G query heads of one kv group
    "head_dim": None,
    "norm": None,
    "lora_rank": None,
    "quant_group": None,
}

Rules = Mapping[str, str | tuple[str, ...] | None]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes; -1 fills what is left of the device count (at most one axis may say -1)."""

    data: int = -1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    dcn_data: int = 1  # multi-slice: data parallel across slices over DCN
    dcn_fsdp: int = 1

    def sizes(self, num_devices: int) -> dict[str, int]:
        sizes = {"data": self.data, "fsdp": self.fsdp, "sequence": self.sequence, "tensor": self.tensor}
        dcn = self.dcn_data * self.dcn_fsdp
        if num_devices % dcn:
            raise ConfigError(f"dcn_data*dcn_fsdp={dcn} does not divide the {num_devices} devices")
        per_slice = num_devices // dcn
        fills = [k for k, v in sizes.items() if v == -1]
        if len(fills) > 1:
            raise ConfigError(f"only one mesh axis may be -1, got {fills}")
        known = math.prod(v for v in sizes.values() if v != -1)
        if any(v == 0 or v < -1 for v in sizes.values()):
            raise ConfigError(f"mesh axis sizes must be positive or -1, got {sizes}")
        if fills:
            if per_slice % known:
                raise ConfigError(
                    f"mesh {sizes} does not divide {per_slice} devices per slice: the fixed axes multiply to {known}")
            sizes[fills[0]] = per_slice // known
        if math.prod(sizes.values()) != per_slice:
            raise ConfigError(
                f"mesh {sizes} multiplies to {math.prod(sizes.values())} but there are {per_slice} devices "
                f"per slice ({num_devices} in all); set one axis to -1 or fix the sizes")
        sizes["data"] *= self.dcn_data
        sizes["fsdp"] *= self.dcn_fsdp
        return sizes


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, sequence, tensor) over `devices` (default: all)."""
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    sizes = config.sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if config.dcn_data * config.dcn_fsdp > 1:
        from jax.experimental import mesh_utils

        ici = (sizes["data"] // config.dcn_data, sizes["fsdp"] // config.dcn_fsdp, sizes["sequence"], sizes["tensor"])
        dcn = (config.dcn_data, config.dcn_fsdp, 1, 1)
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # CPU or odd topologies: plain order is fine
            arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names; None in `names` means replicated on purpose."""
    rules = DEFAULT_RULES if rules is None else rules
    out: list[Any] = []
    used: set[str] = set()
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis can shard only one dim
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (e.g. 2 kv heads over tensor=4): replicate that dim."""
    fixed = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            fixed.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        keep = []
        size = 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        fixed.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*fixed)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Rules | None = None) -> NamedSharding:
    spec = logical_to_spec(names, rules)
    if shape is not None:
        spec = _fit_spec(spec, shape, mesh)
    return NamedSharding(mesh, spec)


# ---- the active mesh, for activation constraints inside model code --------------------------------
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("ij_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules | None = None) -> Iterator[None]:
    """Within this block `constrain` shards activations over `mesh` by `rules`."""
    token = _ACTIVE.set(None if mesh is None else (mesh, DEFAULT_RULES if rules is None else rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    cur = _ACTIVE.get()
    return None if cur is None else cur[0]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names under the active mesh; identity without one."""
    cur = _ACTIVE.get()
    if cur is None:
        return x
    mesh, rules = cur
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any, rules: Rules | None = None) -> Any:
    """NamedShardings for a pytree, given a matching pytree of logical-name tuples and of shapes/arrays."""
    is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)  # noqa: E731
    return jax.tree.map(lambda names, s: named_sharding(mesh, names, getattr(s, "shape", s), rules),
                        axes_tree, shapes_tree, is_leaf=is_leaf)
