"""Checkpoints: InternLM2 HF folders in and out (`load_hf`, `save_hf`), export to Llama's layout
(`save_llama`), and our own orbax param checkpoints (`save_params`, `restore_params`). Names resolve lazily
so importing one side does not import the other."""

from __future__ import annotations

import importlib
from typing import Any

from internlm_jax.checkpoint.errors import CheckpointError

_EXPORTS = {
    "load_hf": "internlm_jax.checkpoint.hf",
    "save_hf": "internlm_jax.checkpoint.hf",
    "dense_weight": "internlm_jax.checkpoint.hf",
    "save_llama": "internlm_jax.checkpoint.llama",
    "save_params": "internlm_jax.checkpoint.orbax_io",
    "restore_params": "internlm_jax.checkpoint.orbax_io",
    "read_config": "internlm_jax.checkpoint.orbax_io",
    "read_extra": "internlm_jax.checkpoint.orbax_io",
}
__all__ = [
    "CheckpointError",
    "dense_weight",
    "load_hf",
    "read_config",
    "read_extra",
    "restore_params",
    "save_hf",
    "save_llama",
    "save_params",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'internlm_jax.checkpoint' has no attribute {name!r}")
