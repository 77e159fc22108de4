"""Saving LoRA adapters apart from the base model: an HF PEFT-style folder, or an orbax checkpoint.

PEFT folder (what `peft.PeftModel.from_pretrained` reads for an InternLM2 base):
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules", ...}
    adapter_model.safetensors  base_model.model.model.layers.{i}.attention.wqkv.lora_A.weight  [r, in]
                               base_model.model.model.layers.{i}.attention.wqkv.lora_B.weight  [out, r]
                               (attention.wo, feed_forward.w1/w2/w3, and base_model.model.output.*)
`in` / `out` are the HF Linear's dims, i.e. ours flattened in row-major order: wqkv out = K*(G+2)*H in the
packed-by-kv-head order, wo in = N*H with head n = k*G + g (see checkpoint/hf_layout.py), so
lora_A = a.reshape(in, r).T and lora_B = b.reshape(r, out).T.

Orbax folder:
    adapters/          StandardCheckpointer tree {"layers": {"wqkv": {"a", "b"}, ...}, "output": {...}}
    lora_config.json   rank, alpha, dropout, and per target its in_ndim and a / b shapes and dtype (written last)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.checkpoint.errors import CheckpointError
from internlm_jax.checkpoint.safetensors_io import PlannedTensor, SafetensorsReader, write_safetensors
from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.peft.lora import LoraWeight, _set, _walk, lora_summary
from internlm_jax.quant.int4 import LAYER_TARGETS, LINEAR_AXES

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ORBAX_CONFIG = "lora_config.json"
ORBAX_DIR = "adapters"
_HF_MODULE = {"wqkv": "attention.wqkv", "wo": "attention.wo", "w1": "feed_forward.w1", "w2": "feed_forward.w2",
              "w3": "feed_forward.w3"}


def peft_name(target: str, layer: int | None, which: Literal["A", "B"]) -> str:
    """The PEFT tensor name of one adapter matrix."""
    if target == "output":
        return f"base_model.model.output.lora_{which}.weight"
    return f"base_model.model.model.layers.{layer}.{_HF_MODULE[target]}.lora_{which}.weight"


def target_shapes(config: ModelConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Our (in, out) dims of a target's weight."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    K, G, H = config.num_kv_heads, config.groups, config.head_dim
    return {"wqkv": ((D,), (K, G + 2, H)), "wo": ((K, G, H), (D,)), "w1": ((D,), (F,)), "w3": ((D,), (F,)),
            "w2": ((F,), (D,)), "output": ((D,), (V,))}[target]


def _adapters_of(tree: Any) -> list[tuple[tuple[str, ...], LoraWeight]]:
    found = [(p, x) for p, x in _walk(tree) if isinstance(x, LoraWeight)]
    if not found:
        raise ConfigError("no LoRA adapters to save: pass params from apply_lora or an adapter tree")
    return found


def _prepare_dir(path: str | os.PathLike, overwrite: bool) -> tuple[str, str]:
    target = os.path.abspath(os.fspath(path))
    if (os.path.isdir(target) and os.listdir(target) or os.path.isfile(target)) and not overwrite:
        raise CheckpointError(f"{target} already exists; choose a new folder or pass overwrite=True")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    return target, tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)


def _finish(tmp: str, target: str) -> None:
    if os.path.exists(target):
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    os.replace(tmp, target)


def save_adapters(path: str | os.PathLike, params_or_adapters: Any, config: ModelConfig, *,
                  format: Literal["peft", "orbax"] = "peft", base_model_name_or_path: str | None = None,
                  overwrite: bool = False) -> None:
    """Write the adapters of `params_or_adapters` (params with LoraWeight leaves, or a split adapter tree)."""
    found = _adapters_of(params_or_adapters)
    summary = lora_summary(params_or_adapters)
    for p, ad in found:
        in_s, out_s = target_shapes(config, p[-1])
        if ad.in_shape != in_s or ad.out_shape != out_s:
            raise ConfigError(f"adapter {'/'.join(p)} has in {ad.in_shape} / out {ad.out_shape}, but the config "
                              f"expects {in_s} / {out_s}: wrong config for these adapters")
    if format not in ("peft", "orbax"):
        raise ConfigError(f"adapter format must be 'peft' or 'orbax', got {format!r}")
    target, tmp = _prepare_dir(path, overwrite)
    try:
        if format == "peft":
            _save_peft(tmp, found, summary, config, base_model_name_or_path)
        else:
            _save_orbax(tmp, found, summary)
        _finish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_peft(folder: str, found, summary, config: ModelConfig, base_name: str | None) -> None:
    if summary["rank"] is None or summary["alpha"] is None:
        raise ConfigError("the PEFT format here needs one rank and one alpha for every target; these adapters "
                          "differ per target: save with format='orbax'")
    planned = []
    for path, ad in found:
        name = path[-1]
        layers = range(config.num_layers) if name in LAYER_TARGETS else [None]
        r = ad.rank
        for i in layers:
            a = ad.a if i is None else ad.a[i]
            b = ad.b if i is None else ad.b[i]
            for which, arr, fn in (("A", a, lambda x, r=r: x.reshape(-1, r).T), ("B", b, lambda x, r=r: x.reshape(r, -1).T)):
                host = np.ascontiguousarray(fn(np.asarray(arr)))
                planned.append(PlannedTensor(peft_name(name, i, which), host.shape, host.dtype, lambda h=host: h))
    write_safetensors(os.path.join(folder, PEFT_WEIGHTS), planned)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": summary["rank"], "lora_alpha": summary["alpha"], "lora_dropout": summary["dropout"] or 0.0,
        "target_modules": sorted({p[-1] for p, _ in found}), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    with open(os.path.join(folder, PEFT_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def _save_orbax(folder: str, found, summary) -> None:
    import orbax.checkpoint as ocp

    tree: dict[str, Any] = {}
    meta: dict[str, Any] = {"format": "internlm-jax-lora", "version": 1, "targets": {}}
    for path, ad in found:
        _set(tree, path, {"a": ad.a, "b": ad.b}, create=True)
        meta["targets"]["/".join(path)] = {"in_ndim": ad.in_ndim, "alpha": ad.alpha, "dropout": ad.dropout,
                                           "a_shape": list(ad.a.shape), "b_shape": list(ad.b.shape),
                                           "dtype": jnp.dtype(ad.a.dtype).name}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(folder, ORBAX_DIR), tree)
        ckptr.wait_until_finished()
    with open(os.path.join(folder, ORBAX_CONFIG), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def load_adapters(path: str | os.PathLike, config: ModelConfig) -> dict[str, Any]:
    """An adapter tree (LoraWeight(base=None) leaves) from a PEFT folder or our orbax adapter folder; put it on
    a base with `merge_adapters(base_params, adapters)`."""
    root = os.fspath(path)
    if os.path.exists(os.path.join(root, PEFT_CONFIG)):
        return _load_peft(root, config)
    if os.path.exists(os.path.join(root, ORBAX_CONFIG)):
        return _load_orbax(root)
    raise CheckpointError(f"{root} holds no adapters: expected {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT) or "
                          f"{ORBAX_CONFIG} + {ORBAX_DIR}/ (save_adapters(..., format='orbax'))")


def _load_peft(root: str, config: ModelConfig) -> dict[str, Any]:
    with open(os.path.join(root, PEFT_CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{root}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("use_rslora", "use_dora"):
        if cfg.get(key):
            raise CheckpointError(f"{root}: {key}=true adapters are not supported (plain LoRA scaling alpha/r only)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{root}: per-module rank_pattern / alpha_pattern are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise CheckpointError(f"{root}: adapters with trained biases or modules_to_save are not supported")
    wpath = os.path.join(root, PEFT_WEIGHTS)
    if not os.path.exists(wpath):
        extra = " (only adapter_model.bin found: re-save it with safe_serialization=True)" if os.path.exists(
            os.path.join(root, "adapter_model.bin")) else ""
        raise CheckpointError(f"{root}: {PEFT_WEIGHTS} is missing{extra}")
    reader = SafetensorsReader(wpath)
    names = set(reader.tensors)
    alpha, r_cfg = float(cfg["lora_alpha"]), int(cfg["r"])
    dropout = float(cfg.get("lora_dropout") or 0.0)
    adapters: dict[str, Any] = {}
    used: set[str] = set()
    for target in LINEAR_AXES:
        layers = list(range(config.num_layers)) if target in LAYER_TARGETS else [None]
        present = [i for i in layers if peft_name(target, i, "A") in names]
        if not present:
            continue
        if len(present) != len(layers):
            missing = sorted(set(layers) - set(present))
            raise CheckpointError(f"{root}: {target} adapters exist for some layers but not {missing}; adapters "
                                  f"for a subset of layers are not supported (or the config has the wrong "
                                  f"num_layers={config.num_layers})")
        in_s, out_s = target_shapes(config, target)
        a_list, b_list = [], []
        for i in layers:
            na, nb = peft_name(target, i, "A"), peft_name(target, i, "B")
            if nb not in names:
                raise CheckpointError(f"{root}: {na} has no matching {nb}")
            A, B = reader.read(na), reader.read(nb)
            used.update((na, nb))
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[1] != np.prod(in_s) \
                    or B.shape[0] != np.prod(out_s):
                raise ConfigError(f"{root}: {na} {list(A.shape)} / {nb} {list(B.shape)} do not fit this model's "
                                  f"{target} (in {int(np.prod(in_s))}, out {int(np.prod(out_s))}): the adapters were "
                                  "trained on a model of another shape")
            if A.shape[0] != r_cfg:
                raise CheckpointError(f"{root}: {na} has rank {A.shape[0]} but adapter_config.json says r={r_cfg}")
            a_list.append(A.T.reshape(*in_s, -1))
            b_list.append(B.T.reshape(-1, *out_s))
        a = np.stack(a_list) if target in LAYER_TARGETS else a_list[0]
        b = np.stack(b_list) if target in LAYER_TARGETS else b_list[0]
        path = ("output",) if target == "output" else ("layers", target)
        _set(adapters, path, LoraWeight(base=None, a=jnp.asarray(a), b=jnp.asarray(b), alpha=alpha,
                                        dropout=dropout, in_ndim=len(in_s)), create=True)
    unknown = sorted(names - used)
    if unknown:
        raise CheckpointError(f"{root}: tensors this model has no place for: {unknown[:3]}"
                              f"{' ...' if len(unknown) > 3 else ''} (another architecture's adapters?)")
    if not adapters:
        raise CheckpointError(f"{root}: no LoRA tensors found in {PEFT_WEIGHTS}")
    return adapters


def _load_orbax(root: str) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    with open(os.path.join(root, ORBAX_CONFIG)) as f:
        meta = json.load(f)
    if meta.get("format") != "internlm-jax-lora":
        raise CheckpointError(f"{root}/{ORBAX_CONFIG} is not an internlm-jax LoRA config")
    target: dict[str, Any] = {}
    for key, m in meta["targets"].items():
        path = tuple(key.split("/"))
        dt = jnp.dtype(m["dtype"])
        _set(target, path, {"a": jax.ShapeDtypeStruct(tuple(m["a_shape"]), dt),
                            "b": jax.ShapeDtypeStruct(tuple(m["b_shape"]), dt)}, create=True)
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(os.path.abspath(root), ORBAX_DIR), target)
    adapters: dict[str, Any] = {}
    for key, m in meta["targets"].items():
        path = tuple(key.split("/"))
        node = tree
        for k in path:
            node = node[k]
        _set(adapters, path, LoraWeight(base=None, a=node["a"], b=node["b"], alpha=float(m["alpha"]),
                                        dropout=float(m["dropout"]), in_ndim=int(m["in_ndim"])), create=True)
    return adapters
