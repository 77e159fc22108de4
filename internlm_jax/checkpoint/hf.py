"""InternLM2 HF checkpoints in and out: `load_hf` streams tensors into (sharded) device arrays, `save_hf`
streams them back out into sharded safetensors.

Memory: loading first allocates each stacked [L, ...] leaf on device (zeros, in its final sharding), then
reads one HF tensor at a time, converts it on the host and writes it into its layer slot with a jitted,
donating dynamic_update_slice. Host memory therefore holds about one tensor in file layout plus one in our
layout at a time; the model itself only ever exists on device (on a CPU backend "device" memory is host
memory too, so there RSS grows by the model plus that overhead). Saving gathers one layer of one leaf at
a time.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding
from tqdm.auto import tqdm

from internlm_jax.checkpoint.errors import CheckpointError
from internlm_jax.checkpoint.hf_layout import (
    IGNORED_SUFFIXES,
    SPECS,
    LeafSpec,
    Target,
    get_path,
    hf_tensors,
    set_path,
)
from internlm_jax.checkpoint.hf_sources import FOLDER_HINT, Meta, open_source
from internlm_jax.checkpoint.safetensors_io import PlannedTensor, plan_shards, write_safetensors
from internlm_jax.config import ModelConfig
from internlm_jax.model import param_axes, param_shapes
from internlm_jax.sharding import Rules, named_sharding

Params = dict[str, Any]
_FLOATS = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json", "tokenization_internlm2.py", "tokenization_internlm2_fast.py")
# The reference implementation's remote code: copied with the tokenizer so `trust_remote_code` loads the export.
REMOTE_CODE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py", "generation_config.json")


# ---- loading ---------------------------------------------------------------------------------------------
def load_hf(path: str | os.PathLike, *, config: ModelConfig | None = None, dtype: Any = None,
            mesh: Mesh | None = None, rules: Rules | None = None, progress: bool = True
            ) -> tuple[ModelConfig, Params]:
    """Read an InternLM2 HF folder into (config, params).

    config: use this instead of config.json (shapes are still checked against the files).
    dtype: storage dtype of the params (float32 / bfloat16 / float16). Default: the given config's
        param_dtype, else config.json's torch_dtype, else float32. The returned config's param_dtype says it.
    mesh/rules: place every leaf in its `param_axes` sharding on this mesh; default: the first local device.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise CheckpointError(f"{folder} {what}; {FOLDER_HINT}")
    explicit = config is not None
    hf_config = _read_config_json(folder, required=not explicit)
    if config is None:
        config = ModelConfig.from_hf_config(hf_config)
    if dtype is None and explicit:
        dtype = config.param_dtype
    elif dtype is None:
        stored = hf_config.get("torch_dtype", hf_config.get("dtype"))
        dtype = stored if stored in _FLOATS else "float32"
    out_dtype = _resolve_dtype(dtype, None)
    config = config.replace(param_dtype=out_dtype.name)

    source = open_source(folder)
    targets = dict(hf_tensors(config))
    _check_names_and_shapes(source.tensors(), targets, config, folder,
                            "the given config" if explicit else "config.json")

    placer = _Placer(config, out_dtype, mesh, rules)
    total = len(targets)
    start = time.perf_counter()
    with tqdm(total=total, desc=f"loading {os.path.basename(os.path.normpath(folder))}", unit="tensor",
              disable=not progress) as bar:
        for name, array in source.iter_tensors():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            placer.put(targets[name], array)
            del array
            bar.update(1)
    params = placer.finish()
    if progress:
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        tqdm.write(f"loaded {_count(config.num_params())} params ({nbytes / 2**30:.2f} GiB {out_dtype.name}) "
                   f"from {total} {source.kind} tensors in {time.perf_counter() - start:.1f}s")
    return config, params


def _read_config_json(folder: str, required: bool) -> dict[str, Any] | None:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        if required:
            raise CheckpointError(f"no config.json in {folder}; {FOLDER_HINT}. If you only have weights, pass "
                                  "config=ModelConfig(...) or a preset from internlm_jax.get_preset(...)")
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _resolve_dtype(dtype: Any, fallback: Any) -> np.dtype:
    choice = dtype if dtype is not None else fallback
    if choice is None:
        return jnp.dtype(jnp.float32)
    try:
        resolved = jnp.dtype(choice)
    except TypeError:
        raise CheckpointError(f"unknown dtype {choice!r}; use one of {', '.join(_FLOATS)}") from None
    if resolved.name not in _FLOATS:
        raise CheckpointError(f"params must be stored as one of {', '.join(_FLOATS)}, got {resolved.name}")
    return resolved


def _check_names_and_shapes(found: dict[str, Meta], targets: dict[str, Target], config: ModelConfig,
                            folder: str, config_source: str) -> None:
    present = {n for n in found if not n.endswith(IGNORED_SUFFIXES)}
    missing = [n for n in targets if n not in present]
    unexpected = sorted(present - targets.keys())
    dims = (f"L={config.num_layers}, D={config.hidden_size}, N={config.num_heads}, K={config.num_kv_heads}, "
            f"H={config.head_dim}, F={config.intermediate_size}, V={config.vocab_size}")
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} is missing" +
                              (f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}...)" if len(missing) > 1
                               else "") + f"; {config_source} ({dims}) expects it. Is the download complete?")
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensor {unexpected[0]!r} in {found[unexpected[0]].file}" +
                              (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") +
                              f"; an InternLM2 checkpoint with {dims} has no such weight. Is this an InternLM2 "
                              "checkpoint (Llama-style names need converting first)?")
    for name, target in targets.items():
        want, got = target.spec.hf_shape(config), found[name].shape
        if tuple(got) != tuple(want):
            raise CheckpointError(f"tensor {name!r} in {found[name].file} has shape {list(got)}, but "
                                  f"{config_source} ({dims}) expects {list(want)}")
        if not np.issubdtype(found[name].dtype, np.floating) and found[name].dtype.name != "bfloat16":
            raise CheckpointError(f"tensor {name!r} is stored as {found[name].dtype}; expected floating point "
                                  "(quantized HF checkpoints are not supported: load the fp16/bf16 release)")


@functools.cache
def _layer_setter(sharding: Sharding):
    # Donating the stack lets XLA write the layer in place: device memory stays at one stack, not two.
    return jax.jit(lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x, i, 0),
                   out_shardings=sharding, donate_argnums=0)


def _drop_leading(sharding: Sharding) -> Sharding:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


class _Placer:
    """Owns the device arrays being filled; `put` places one HF tensor."""

    def __init__(self, config: ModelConfig, dtype: np.dtype, mesh: Mesh | None, rules: Rules | None):
        self.config, self.dtype = config, dtype
        shapes, axes = param_shapes(config), param_axes(config)
        single = SingleDeviceSharding(jax.local_devices()[0])
        self.params: Params = {}
        self.shardings: dict[tuple[str, ...], Sharding] = {}
        for spec in SPECS:
            shape = get_path(shapes, spec.path)
            sharding = single if mesh is None else named_sharding(mesh, get_path(axes, spec.path), shape, rules)
            self.shardings[spec.path] = sharding
            if spec.stacked:
                set_path(self.params, spec.path, jnp.zeros(shape, dtype, device=sharding))

    def put(self, target: Target, array: np.ndarray) -> None:
        spec = target.spec
        if array.dtype != self.dtype:
            array = array.astype(self.dtype)  # host cast: the file-layout copy is dropped right after
        ours = spec.to_ours(array, self.config)  # a view (transpose/reshape) of `array`
        sharding = self.shardings[spec.path]
        if target.layer is None:
            set_path(self.params, spec.path, _to_device(ours, sharding))
            return
        layer = _to_device(ours, _drop_leading(sharding))
        stack = get_path(self.params, spec.path)
        set_path(self.params, spec.path, _layer_setter(sharding)(stack, layer, np.int32(target.layer)))

    def finish(self) -> Params:
        missing = [s.path for s in SPECS if not s.stacked and _get_or_none(self.params, s.path) is None]
        if missing:  # cannot happen after the name check; guards a source that yields fewer tensors than listed
            raise CheckpointError(f"weights {missing} were listed but never read; the checkpoint files changed?")
        return self.params


def _get_or_none(tree: Params, path: tuple[str, ...]) -> Any:
    try:
        return get_path(tree, path)
    except KeyError:
        return None


def _to_device(host: np.ndarray, sharding: Sharding) -> jax.Array:
    # Each device (or process) copies only its own slice of the host tensor.
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# ---- saving ----------------------------------------------------------------------------------------------
def dense_weight(leaf: Any, where: str) -> Any:
    """The plain array behind a leaf. Weight objects (LoRA, int4) must be merged/dequantized before export:
    an object offering `to_dense()` is materialised here, anything else is an error naming the fix."""
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return leaf
    if hasattr(leaf, "to_dense"):
        return leaf.to_dense()
    raise CheckpointError(f"param {where} is a {type(leaf).__name__}, not an array: merge LoRA adapters "
                          "(`internlm-jax convert merge`) or dequantize before exporting to HF")


def save_hf(path: str | os.PathLike, params: Params, config: ModelConfig, *, tokenizer_dir: str | os.PathLike | None
            = None, source_dir: str | os.PathLike | None = None, max_shard_bytes: int = 2**30, dtype: Any = None,
            overwrite: bool = False, progress: bool = True) -> None:
    """Write an HF InternLM2 folder: config.json, generation_config.json, tokenizer files (copied from
    `tokenizer_dir`), model-0000k-of-0000n.safetensors + model.safetensors.index.json.

    source_dir: the HF folder these weights were loaded from. Its tokenizer files and the reference's remote
    code (configuration_internlm2.py, modeling_internlm2.py, tokenization_internlm2*.py) are copied, and its
    config.json's `auto_map` is kept, so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`
    opens the result. Tokenizer files from `tokenizer_dir`, when given too, win over the source's.

    Streams one layer of one leaf at a time to the host. Writes into a temporary folder beside `path` and
    renames it into place at the end, so a crash never leaves a half-written checkpoint at `path`.
    """
    target = check_target(path, overwrite)
    sources = copy_sources(source_dir, tokenizer_dir)
    leaves, config = export_leaves(params, config, dtype)
    planned = [plan_tensor(name, t.spec.hf_shape(config), leaves[t.spec.path], t, config)
               for name, t in hf_tensors(config)]
    hf_config = config.to_hf_config()
    auto_map = _source_auto_map(source_dir)
    if auto_map is not None:
        hf_config["auto_map"] = auto_map
    write_folder(target, planned, hf_config, config, sources, max_shard_bytes=max_shard_bytes, progress=progress)


def check_target(path: str | os.PathLike, overwrite: bool) -> str:
    """The absolute output folder, refused early (before any work) if it holds something and may not be replaced."""
    target = os.path.abspath(os.fspath(path))
    if os.path.exists(target) and not overwrite and (not os.path.isdir(target) or os.listdir(target)):
        raise CheckpointError(f"{target} already exists; choose a new folder or pass overwrite=True")
    return target


def copy_sources(source_dir: str | os.PathLike | None, tokenizer_dir: str | os.PathLike | None) -> list[str]:
    """The folders whose tokenizer and remote-code files an export copies, in copy order (later wins)."""
    if source_dir is not None and not os.path.isdir(source_dir):
        raise CheckpointError(f"source_dir {os.fspath(source_dir)} is not a folder: pass the HF folder the weights "
                              "were loaded from (it holds config.json and the tokenizer files), or None")
    if tokenizer_dir is not None and not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.model")):
        raise CheckpointError(f"no tokenizer.model in {tokenizer_dir}: tokenizer_dir must be a folder holding the "
                              "tokenizer files (tokenizer.model, tokenizer_config.json)")
    return [os.fspath(d) for d in (source_dir, tokenizer_dir) if d is not None]


def export_leaves(params: Params, config: ModelConfig, dtype: Any
                  ) -> tuple[dict[tuple[str, ...], Any], ModelConfig]:
    """Every leaf of `params` as a plain array (by spec path), checked against the shapes `config` implies,
    and the config with the export's storage dtype (`dtype`, default the params' own) as its param_dtype."""
    leaves = {s.path: dense_weight(_leaf(params, s), "/".join(s.path)) for s in SPECS}
    shapes = param_shapes(config)
    for spec in SPECS:
        got, want = tuple(leaves[spec.path].shape), get_path(shapes, spec.path)
        if got != want:
            raise CheckpointError(f"param {'/'.join(spec.path)} has shape {list(got)}, but the config expects "
                                  f"{list(want)}: the params do not belong to this config")
    out_dtype = _resolve_dtype(dtype, leaves[("embed",)].dtype)
    return leaves, config.replace(param_dtype=out_dtype.name)


def plan_tensor(name: str, shape: tuple[int, ...], leaf: Any, target: Target, config: ModelConfig
                ) -> PlannedTensor:
    """One tensor to write: `target.spec.to_hf` of `leaf` (of its layer, if stacked) in config.param_dtype,
    gathered to the host only when the writer reaches it."""
    dtype = jnp.dtype(config.param_dtype)
    return PlannedTensor(name, tuple(shape), dtype, functools.partial(_produce, leaf, target, config, dtype))


def write_folder(target: str, planned: list[PlannedTensor], hf_config: dict[str, Any], config: ModelConfig,
                 sources: list[str], *, max_shard_bytes: int, progress: bool,
                 file_names: tuple[str, ...] = TOKENIZER_FILES + REMOTE_CODE_FILES) -> None:
    """Write `planned` as sharded safetensors with their index, `hf_config` as config.json, a
    generation_config.json, and the `file_names` present in each of `sources` (later folders win), into a
    temporary folder renamed to `target` at the end. Every process gathers (collectives); process 0 writes."""
    shards = plan_shards(planned, max_shard_bytes)
    writer = jax.process_index() == 0
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent) if writer else os.devnull
    start = time.perf_counter()
    try:
        n = len(shards)
        weight_map: dict[str, str] = {}
        with tqdm(total=len(planned), desc=f"saving {os.path.basename(target)}", unit="tensor",
                  disable=not progress) as bar:
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{n:05d}.safetensors"
                dest = os.path.join(tmp, fname) if writer else os.devnull
                write_safetensors(dest, shard, on_tensor=lambda _: bar.update(1))
                weight_map.update({t.name: fname for t in shard})
        if writer:
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": sum(t.nbytes for t in planned)}, "weight_map": weight_map})
            _write_json(os.path.join(tmp, "config.json"), hf_config)
            _write_generation_config(tmp, config, sources)  # a generation_config.json among the sources wins
            for src in sources:
                _copy_files(src, tmp, file_names)
            _move_into_place(tmp, target)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress and writer:
        total = sum(t.nbytes for t in planned)
        tqdm.write(f"saved {_count(config.num_params())} params ({total / 2**30:.2f} GiB {config.param_dtype}) "
                   f"in {n} shard(s) to {target} in {time.perf_counter() - start:.1f}s")


def _source_auto_map(source_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    if source_dir is None:
        return None
    source_config = _read_config_json(os.fspath(source_dir), required=False)
    auto_map = (source_config or {}).get("auto_map")
    return auto_map if isinstance(auto_map, dict) else None


def _leaf(params: Params, spec: LeafSpec) -> Any:
    try:
        return get_path(params, spec.path)
    except (KeyError, TypeError):
        raise CheckpointError(f"params lack {'/'.join(spec.path)}: expected the tree of "
                              "internlm_jax.model.init_params") from None


@functools.cache
def _layer_getter():
    return jax.jit(lambda stack, i: jax.lax.dynamic_index_in_dim(stack, i, 0, keepdims=False))


def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _produce(leaf: Any, target: Target, config: ModelConfig, dtype: np.dtype) -> np.ndarray:
    if target.layer is None:
        host = _to_host(leaf)
    elif isinstance(leaf, np.ndarray):
        host = leaf[target.layer]
    else:
        host = _to_host(_layer_getter()(leaf, np.int32(target.layer)))
    return np.ascontiguousarray(target.spec.to_hf(host, config).astype(dtype, copy=False))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_generation_config(folder: str, config: ModelConfig, sources: list[str]) -> None:
    eos: list[int] = [config.eos_token_id]
    tc_paths = [os.path.join(d, "tokenizer_config.json") for d in sources]
    tc_paths = [p for p in tc_paths if os.path.exists(p)]
    if tc_paths:
        with open(tc_paths[-1]) as f:
            decoder = json.load(f).get("added_tokens_decoder", {})
        # Chat checkpoints also stop on <|im_end|>; its id comes from the tokenizer, never a constant.
        eos += [int(i) for i, tok in decoder.items() if tok.get("content") == "<|im_end|>"]
    _write_json(os.path.join(folder, "generation_config.json"),
                {"bos_token_id": config.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
                 "pad_token_id": config.pad_token_id})


def _copy_files(src: str, dst: str, names: tuple[str, ...]) -> None:
    for name in names:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _move_into_place(tmp: str, target: str) -> None:
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rename(target, os.path.join(old, "x"))
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
