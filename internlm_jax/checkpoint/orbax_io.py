"""Our own param checkpoints: an orbax PyTree under `params/`, the ModelConfig as JSON beside it.

Layout of a checkpoint folder:
    params/              orbax StandardCheckpointer output (tensorstore; restorable into any sharding)
    model_config.json    dataclasses.asdict(ModelConfig); written last, so its presence marks a complete save
    extra.json           optional caller metadata (e.g. the source HF folder, a step number)

The folder deliberately has no `config.json`: that name marks an HF folder (see `internlm_jax.api.load`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from internlm_jax.checkpoint.errors import CheckpointError
from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.model import param_axes, param_shapes
from internlm_jax.sharding import Rules, tree_shardings

CONFIG_FILE = "model_config.json"
EXTRA_FILE = "extra.json"
PARAMS_DIR = "params"
_FLOATS = ("float32", "bfloat16", "float16")


def save_params(path: str | os.PathLike, params: Any, config: ModelConfig, extra: dict[str, Any] | None = None,
                *, overwrite: bool = False) -> None:
    """Save params (any sharding; every process must call this) and config to `path`."""
    root = os.path.abspath(os.fspath(path))
    exists = os.path.exists(os.path.join(root, PARAMS_DIR)) or os.path.exists(os.path.join(root, CONFIG_FILE))
    if exists and not overwrite:
        raise CheckpointError(f"{root} already holds a checkpoint; choose a new folder or pass overwrite=True")
    first = jax.tree.leaves(params)[0]
    config = config.replace(param_dtype=jnp.dtype(first.dtype).name)
    if jax.process_index() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(os.path.join(root, CONFIG_FILE)):
            os.remove(os.path.join(root, CONFIG_FILE))  # an overwrite in progress is not a complete checkpoint
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(root, PARAMS_DIR), params, force=overwrite)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        if extra is not None:
            _write_json(os.path.join(root, EXTRA_FILE), extra)
        _write_json(os.path.join(root, CONFIG_FILE), dataclasses.asdict(config))


def read_config(path: str | os.PathLike) -> ModelConfig:
    root = os.fspath(path)
    cfg_path = os.path.join(root, CONFIG_FILE)
    if not os.path.isdir(root):
        raise CheckpointError(f"{root} is not a folder; an internlm-jax checkpoint is a folder with "
                              f"{CONFIG_FILE} and {PARAMS_DIR}/")
    if not os.path.exists(cfg_path) or not os.path.isdir(os.path.join(root, PARAMS_DIR)):
        if os.path.exists(os.path.join(root, "config.json")):
            hint = " It looks like an HF folder: use load_hf or `internlm-jax convert --from-hf`."
        elif os.path.isdir(os.path.join(root, PARAMS_DIR)):
            hint = f" params/ exists without {CONFIG_FILE}: the save was interrupted; re-run it."
        else:
            hint = " Point at a folder written by save_params or `internlm-jax convert --from-hf DIR --to CKPT`."
        raise CheckpointError(f"{root} is not a complete internlm-jax checkpoint (needs {CONFIG_FILE} and "
                              f"{PARAMS_DIR}/).{hint}")
    with open(cfg_path) as f:
        fields = json.load(f)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = tuple(fields["rope_scaling"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{cfg_path} has fields this version does not know: {unknown}; upgrade internlm-jax")
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def read_extra(path: str | os.PathLike) -> dict[str, Any]:
    extra = os.path.join(os.fspath(path), EXTRA_FILE)
    if not os.path.exists(extra):
        return {}
    with open(extra) as f:
        return json.load(f)


def restore_params(path: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules | None = None,
                   dtype: Any = None) -> tuple[ModelConfig, Any]:
    """(config, params), each leaf restored straight into its `param_axes` sharding on `mesh` (default: the
    first local device) and cast to `dtype` (default: the dtype it was saved in)."""
    root = os.path.abspath(os.fspath(path))
    config = read_config(root)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        if name not in _FLOATS:
            raise CheckpointError(f"dtype must be one of {', '.join(_FLOATS)}, got {name}")
        config = config.replace(param_dtype=name)
    shapes = param_shapes(config)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    if mesh is None:
        single = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes, is_leaf=is_shape)
    else:
        shardings = tree_shardings(mesh, param_axes(config), shapes, rules)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.dtype(config.param_dtype), sharding=sh),
                          shapes, shardings, is_leaf=is_shape)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(os.path.join(root, PARAMS_DIR), target)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot restore {root}/{PARAMS_DIR} as params of {CONFIG_FILE}'s model: {e}") from None
    return config, params


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
