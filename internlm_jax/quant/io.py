"""Quantized checkpoints: safetensors shards plus a JSON manifest, in one folder.

    DIR/quant_manifest.json          format, ModelConfig, quantization info, every leaf (kind, static fields,
                                     tensor names), tensor -> shard file. Written last: its presence marks a
                                     complete checkpoint.
    DIR/model-0000k-of-0000n.safetensors

Tensor names are the param path joined by dots, plus the field for int4 leaves: `layers.wqkv.packed`
([L, Din/2, Dout] uint8), `layers.wqkv.scales`, `layers.wqkv.zeros`, `layers.wqkv.input_scale`, `embed`, ...
Loading rebuilds the same tree, with `QuantizedLinear` objects where they were.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.checkpoint.errors import CheckpointError
from internlm_jax.checkpoint.safetensors_io import (
    PlannedTensor,
    SafetensorsReader,
    plan_shards,
    write_safetensors,
)
from internlm_jax.config import ModelConfig
from internlm_jax.quant.int4 import QuantizedLinear, params_nbytes
from kernels_pallas.int4_matmul import Int4Weight

MANIFEST = "quant_manifest.json"
FORMAT = "internlm-jax-int4"
VERSION = 1


def _walk(tree: Any, prefix: tuple[str, ...] = ()):
    if isinstance(tree, dict):
        for k in tree:
            if not isinstance(k, str) or "." in k:
                raise CheckpointError(f"param key {k!r} under {'/'.join(prefix) or 'the root'} cannot be saved: "
                                      "keys must be strings without dots")
            yield from _walk(tree[k], prefix + (k,))
    else:
        yield prefix, tree


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(os.fspath(path), MANIFEST))


def save_quantized(path: str | os.PathLike, params: Any, config: ModelConfig, info: dict[str, Any] | None = None, *,
                   overwrite: bool = False, max_shard_bytes: int = 2**31) -> None:
    """Write `params` (arrays and QuantizedLinear leaves) with `config` and quantization `info` to a folder."""
    target = os.path.abspath(os.fspath(path))
    occupied = os.path.isdir(target) and bool(os.listdir(target)) or os.path.isfile(target)
    if occupied and not overwrite:
        raise CheckpointError(f"{target} already exists; choose a new folder or pass overwrite=True")
    leaves: dict[str, Any] = {}
    planned: list[PlannedTensor] = []

    def plan(name: str, arr: Any) -> str:
        planned.append(PlannedTensor(name, tuple(arr.shape), np.dtype(arr.dtype), lambda a=arr: np.asarray(a)))
        return name

    for path_, leaf in _walk(params):
        key = "/".join(path_)
        base = ".".join(path_)
        if isinstance(leaf, QuantizedLinear):
            w = leaf.weight
            tensors = {"packed": plan(base + ".packed", w.packed), "scales": plan(base + ".scales", w.scales)}
            if w.zeros is not None:
                tensors["zeros"] = plan(base + ".zeros", w.zeros)
            if leaf.input_scale is not None:
                tensors["input_scale"] = plan(base + ".input_scale", leaf.input_scale)
            leaves[key] = {"kind": "int4", "group_size": w.group_size, "in_shape": list(w.in_shape),
                           "out_shape": list(w.out_shape), "impl": leaf.impl, "tensors": tensors}
        elif isinstance(leaf, (jax.Array, np.ndarray)):
            leaves[key] = {"kind": "array", "tensor": plan(base, leaf)}
        else:
            raise CheckpointError(f"param {key} is a {type(leaf).__name__}: a quantized checkpoint holds arrays and "
                                  "QuantizedLinear weights only (merge LoRA adapters, or save them separately with "
                                  "internlm_jax.peft.save_adapters)")
    shards = plan_shards(planned, max_shard_bytes)
    weight_map: dict[str, str] = {}
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(tmp, fname), shard, metadata={"format": "np"})
            weight_map.update({t.name: fname for t in shard})
        manifest = {"format": FORMAT, "version": VERSION, "model_config": dataclasses.asdict(config),
                    "quantization": _jsonable(info or {}), "leaves": leaves, "weight_map": weight_map,
                    "total_bytes": params_nbytes(params)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    root = os.fspath(path)
    mpath = os.path.join(root, MANIFEST)
    if not os.path.exists(mpath):
        hint = (" It looks like an HF folder: quantize it with `internlm-jax quantize --model DIR --out OUT`."
                if os.path.exists(os.path.join(root, "config.json")) else "")
        raise CheckpointError(f"{root} is not a quantized internlm-jax checkpoint (no {MANIFEST}).{hint}")
    with open(mpath) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r} version {manifest.get('version')!r} is "
                              f"not {FORMAT!r} <= {VERSION}; upgrade internlm-jax")
    return manifest


def load_quantized(path: str | os.PathLike) -> tuple[ModelConfig, Any, dict[str, Any]]:
    """(config, params with QuantizedLinear leaves restored, quantization info) from `save_quantized`'s folder."""
    root = os.fspath(path)
    manifest = read_manifest(root)
    fields = dict(manifest["model_config"])
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = tuple(fields["rope_scaling"])
    config = ModelConfig(**fields)
    readers: dict[str, SafetensorsReader] = {}

    def read(name: str) -> jax.Array:
        fname = manifest["weight_map"].get(name)
        if fname is None:
            raise CheckpointError(f"{root}: tensor {name!r} is in the manifest but not in weight_map")
        if fname not in readers:
            fpath = os.path.join(root, fname)
            if not os.path.exists(fpath):
                raise CheckpointError(f"{root}: shard {fname} is missing (incomplete copy?)")
            readers[fname] = SafetensorsReader(fpath)
        if name not in readers[fname].tensors:
            raise CheckpointError(f"{root}/{fname} lacks tensor {name!r}")
        return jnp.asarray(readers[fname].read(name))

    params: dict[str, Any] = {}
    for key, spec in manifest["leaves"].items():
        if spec["kind"] == "array":
            leaf: Any = read(spec["tensor"])
        elif spec["kind"] == "int4":
            t = spec["tensors"]
            w = Int4Weight(packed=read(t["packed"]), scales=read(t["scales"]),
                           zeros=read(t["zeros"]) if "zeros" in t else None, group_size=int(spec["group_size"]),
                           in_shape=tuple(spec["in_shape"]), out_shape=tuple(spec["out_shape"]))
            leaf = QuantizedLinear(weight=w, input_scale=read(t["input_scale"]) if "input_scale" in t else None,
                                   impl=spec.get("impl", "auto"))
        else:
            raise CheckpointError(f"{root}: leaf {key} has unknown kind {spec['kind']!r}")
        node = params
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return config, params, manifest.get("quantization", {})


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, jax.Array)):
        return np.asarray(x).tolist()
    return x
