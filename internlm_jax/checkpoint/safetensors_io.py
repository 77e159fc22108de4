"""A small safetensors reader and streaming writer that never maps a whole file into memory.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(offsets relative to the end of the header), then the raw little-endian tensor bytes. Reading uses pread
into a fresh buffer, one tensor at a time, so resident memory holds only the tensor being read (an mmap'd
file would keep every touched page resident until closed). bf16 comes back as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from internlm_jax.checkpoint.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit; a larger value means a corrupt or foreign file


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsReader:
    """Header of one .safetensors file plus `read(name)`; opened lazily per read (cheap, no mmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise CheckpointError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > _MAX_HEADER:
                    raise CheckpointError(f"{self.path} is not a safetensors file (header length {header_len})")
                header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} has a corrupt safetensors header: {e}") from None
        base = 8 + header_len
        size = os.path.getsize(self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            code = entry.get("dtype")
            if code not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {code!r}, which this loader cannot read")
            begin, end = entry["data_offsets"]
            shape = tuple(int(s) for s in entry["shape"])
            dtype = DTYPES[code]
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or base + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets (truncated file?)")
            self.tensors[name] = TensorInfo(name, dtype, shape, base + begin, end - begin)

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        buf = np.empty(info.nbytes, np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < info.nbytes:  # pread may return short reads on large requests
                n = os.preadv(fd, [view[done:]], info.start + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: unexpected end of file reading {name!r}")
                done += n
        finally:
            os.close(fd)
        return buf.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its bytes are produced on demand by `produce()` (after the header is written)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy grouping in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def _header_bytes(tensors: Iterable[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        if t.dtype not in CODES:
            raise CheckpointError(f"cannot write tensor {t.name!r} of dtype {t.dtype} to safetensors")
        header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned


def write_safetensors(path: str | os.PathLike, tensors: Sequence[PlannedTensor],
                      metadata: dict[str, str] | None = None, on_tensor: Callable[[str], None] | None = None) -> None:
    """Write one file, producing and releasing one tensor at a time."""
    header = _header_bytes(tensors, {"format": "pt", **(metadata or {})})
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in tensors:
            _write_tensor(f, t)
            if on_tensor is not None:
                on_tensor(t.name)


def _write_tensor(f: BinaryIO, t: PlannedTensor) -> None:
    arr = t.produce()
    if tuple(arr.shape) != t.shape or arr.dtype != t.dtype:
        raise CheckpointError(f"tensor {t.name!r}: produced {arr.dtype}{list(arr.shape)}, "
                              f"planned {t.dtype}{list(t.shape)}")
    arr = np.ascontiguousarray(arr)
    f.write(arr.reshape(-1).view(np.uint8).data)
