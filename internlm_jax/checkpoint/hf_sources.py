"""Finding and reading the weight files of an HF folder: safetensors or PyTorch .bin, single or sharded.

A source lists every tensor's name, shape and dtype up front (so names and shapes are checked before any
weight is read) and then yields tensors one at a time, file by file, in on-disk order.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from internlm_jax.checkpoint.errors import CheckpointError
from internlm_jax.checkpoint.safetensors_io import SafetensorsReader

FOLDER_HINT = ("an InternLM2 HF folder needs config.json plus weights: model.safetensors, or "
               "model-0000k-of-0000n.safetensors with model.safetensors.index.json, or pytorch_model.bin "
               "(or its shards with pytorch_model.bin.index.json)")


@dataclass(frozen=True)
class Meta:
    shape: tuple[int, ...]
    dtype: np.dtype
    file: str


class Source(Protocol):
    kind: str
    files: list[str]

    def tensors(self) -> dict[str, Meta]: ...

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]: ...


def open_source(folder: str) -> Source:
    """The weights of `folder`, preferring safetensors over .bin when both exist."""
    st_index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(st_index):
        return SafetensorsSource(_files_from_index(folder, st_index))
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return SafetensorsSource([single])
    others = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if others:  # renamed or hand-made shards without an index: take them all
        return SafetensorsSource(others)
    bin_index = os.path.join(folder, "pytorch_model.bin.index.json")
    if os.path.exists(bin_index):
        return BinSource(_files_from_index(folder, bin_index))
    bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if bins:
        return BinSource(bins)
    present = sorted(os.listdir(folder))
    raise CheckpointError(f"no weight files in {folder} (found: {', '.join(present) or 'nothing'}); {FOLDER_HINT}")


def _files_from_index(folder: str, index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid index (needs a 'weight_map' object): {e}") from None
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise CheckpointError(f"{os.path.basename(index_path)} lists shard files that are not in {folder}: "
                              f"{', '.join(missing)}; download them again or fix the index")
    return [os.path.join(folder, f) for f in files]


def _merge(per_file: list[tuple[str, dict[str, tuple[tuple[int, ...], np.dtype]]]]) -> dict[str, Meta]:
    out: dict[str, Meta] = {}
    for file, entries in per_file:
        for name, (shape, dtype) in entries.items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} appears in both {out[name].file} and {file}")
            out[name] = Meta(shape, dtype, file)
    return out


class SafetensorsSource:
    kind = "safetensors"

    def __init__(self, files: list[str]):
        self.files = files
        self.readers = [SafetensorsReader(f) for f in files]

    def tensors(self) -> dict[str, Meta]:
        return _merge([(r.path, {n: (t.shape, t.dtype) for n, t in r.tensors.items()}) for r in self.readers])

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for reader in self.readers:
            for info in sorted(reader.tensors.values(), key=lambda t: t.start):  # sequential reads
                yield info.name, reader.read(info.name)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "this checkpoint holds PyTorch .bin weights, and reading them needs torch: `pip install torch` "
            "(the CPU wheel is enough), or convert the folder to safetensors once, e.g. with transformers' "
            "`model.save_pretrained(dir, safe_serialization=True)`") from None
    return torch


def _torch_to_numpy(t: Any) -> np.ndarray:
    torch = _import_torch()
    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits as ml_dtypes.bfloat16
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class BinSource:
    """PyTorch .bin shards, memory-mapped when the file is in torch's zip format (pages load on touch)."""

    kind = "bin"

    def __init__(self, files: list[str]):
        self.files = files
        _import_torch()

    def _load(self, file: str) -> dict[str, Any]:
        torch = _import_torch()
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) format cannot be mapped: read it whole
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types; all mean "unreadable"
            raise CheckpointError(f"cannot read {file} with torch.load: {e}") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{file} does not hold a state dict (got {type(sd).__name__})")
        return sd

    def tensors(self) -> dict[str, Meta]:
        per_file = []
        for file in self.files:
            sd = self._load(file)
            per_file.append((file, {n: (tuple(t.shape), _torch_to_numpy(t[:0] if t.ndim else t).dtype)
                                    for n, t in sd.items()}))
            del sd
        return _merge(per_file)

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for file in self.files:
            sd = self._load(file)
            for name in list(sd):
                yield name, _torch_to_numpy(sd.pop(name))
            del sd
