"""The one way to get a model: `ij.load` (HF folder, orbax checkpoint, int4 checkpoint, or a preset with random
weights on request) and `ij.init` (random weights). The notebook API, `serve`/`chat`, eval, the agent CLI and
`quantize` all call these, so every path sees the same config, tokenizer, quantization and placement.
"""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Any

import jax
from jax.sharding import Mesh

from internlm_jax import model as model_lib
from internlm_jax.api import LM, trained_context
from internlm_jax.config import PRESETS, ConfigError, ModelConfig, get_preset
from internlm_jax.sharding import tree_shardings

QUANT_MODES = ("none", "int4")
_warned_context: set[tuple[int, int]] = set()


def _with_context(config: ModelConfig, max_context: int | None) -> ModelConfig:
    """Set an explicit context limit; above the trained range (max_position_embeddings x NTK factor) it warns
    once: the model then extrapolates, as InternLM2's 200K claim does past 32K x its factor."""
    if max_context is None:
        return config
    if max_context < 1:
        raise ConfigError(f"max_context must be a positive number of tokens, got {max_context}")
    trained = trained_context(config)
    if max_context > trained and (max_context, trained) not in _warned_context:
        _warned_context.add((max_context, trained))
        warnings.warn(f"max_context={max_context} is above the trained range of {trained} tokens "
                      f"(max_position_embeddings {config.max_position_embeddings}"
                      f"{'' if config.rope_scaling is None else f' with {config.rope_scaling[0]} x{config.rope_scaling[1]}'}"
                      "): longer inputs are extrapolation", stacklevel=3)
    return config.replace(max_context=int(max_context))


def _tokenizer(tokenizer: Any, default_dir: str | None) -> Any:
    """A Tokenizer from a folder (given, else the checkpoint's own if it has one), or the object given."""
    from internlm_jax.tokenizer import Tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    folder = os.fspath(tokenizer) if tokenizer is not None else default_dir
    if folder is None:
        return None
    if os.path.exists(os.path.join(folder, "tokenizer.model")):
        return Tokenizer.from_dir(folder)
    if tokenizer is not None:
        raise ConfigError(f"no tokenizer.model in {folder!r}: give a folder with tokenizer.model and "
                          "tokenizer_config.json")
    return None


def _quantize(lm: LM, quant: str, group_size: int) -> LM:
    if quant not in QUANT_MODES:
        raise ConfigError(f"quant must be one of {'|'.join(QUANT_MODES)}, got {quant!r}")
    if quant == "int4":
        from internlm_jax.quant.int4 import quantize_params

        lm.params = quantize_params(lm.params, lm.config, group_size=group_size)
    return lm


def init(preset: str | ModelConfig = "internlm2-tiny", seed: int = 0, *, dtype: str | None = None,
         mesh: Mesh | None = None, tokenizer: Any = None, max_context: int | None = None, **overrides: Any) -> LM:
    """Random weights for a preset (or a ModelConfig): for tests, demos and shape checks."""
    config = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    if dtype is not None:
        overrides.setdefault("dtype", dtype)
        overrides.setdefault("param_dtype", dtype)
    if overrides:
        config = config.replace(**overrides)
    config = _with_context(config, max_context)
    fn = model_lib.init_params
    if mesh is not None:
        shardings = tree_shardings(mesh, model_lib.param_axes(config), model_lib.param_shapes(config))
        params = jax.jit(fn, static_argnums=0, out_shardings=shardings)(config, jax.random.key(seed))
    else:
        params = jax.jit(fn, static_argnums=0)(config, jax.random.key(seed))
    return LM(config, params, _tokenizer(tokenizer, None), mesh)


def load(path_or_preset: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
         tokenizer: str | os.PathLike | Any | None = None, quant: str = "none", quant_group_size: int = 128,
         max_context: int | None = None, random_weights: bool = False, seed: int = 0, **overrides: Any) -> LM:
    """Load an InternLM2 HF folder, an internlm-jax orbax checkpoint or an int4 checkpoint (`internlm-jax
    quantize`), optionally onto a mesh.

    dtype: compute and storage dtype ("bfloat16" halves memory). quant="int4": quantize the weights at load
    (round to nearest, `quant_group_size` inputs per scale). max_context: allow inputs up to this many tokens
    (beyond max_position_embeddings x NTK factor the model extrapolates; a warning says so once).
    random_weights=True lets a preset name stand for a model with random weights (`seed`), for testing.
    Other ModelConfig fields (remat, attention_impl, ...) can be overridden by keyword.
    """
    path = os.fspath(path_or_preset)
    if dtype is not None:
        overrides.setdefault("dtype", dtype)
        overrides.setdefault("param_dtype", dtype)
    if not os.path.exists(path):
        if path in PRESETS and random_weights:
            return _quantize(init(path, seed, mesh=mesh, tokenizer=tokenizer, max_context=max_context,
                                  **overrides), quant, quant_group_size)
        if path in PRESETS:
            raise ConfigError(
                f"{path!r} is a model preset, not a checkpoint: no weights come with it. Download the HF "
                f"checkpoint folder (config.json, tokenizer.model, *.safetensors) and call "
                f"ij.load('/path/to/{path}'), or use ij.init({path!r}) for random weights.")
        close = difflib.get_close_matches(path, list(PRESETS), n=1)
        hint = f" (did you mean the preset {close[0]!r}?)" if close else ""
        presets = f", or a preset for random weights ({', '.join(sorted(PRESETS))})" if random_weights else ""
        raise ConfigError(f"no checkpoint at {path!r}{hint}: give an InternLM2 HF folder (with config.json), an "
                          f"internlm-jax orbax checkpoint folder, an int4 folder from `internlm-jax quantize`{presets}")
    from internlm_jax.quant.io import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(path):  # already int4
        if mesh is not None:
            raise ConfigError("loading an int4 checkpoint onto a mesh is not supported yet; load it on one "
                              "device, or load the original weights with mesh=... and quant='int4'")
        if quant != "none":
            raise ConfigError(f"{path!r} is already an int4 checkpoint; load it without quant={quant!r}")
        config, params, _ = load_quantized(path)
    elif os.path.exists(os.path.join(path, "config.json")):
        from internlm_jax.checkpoint.hf import load_hf

        config, params = load_hf(path, dtype=overrides.get("param_dtype"), mesh=mesh)
    else:
        from internlm_jax.checkpoint.orbax_io import restore_params

        config, params = restore_params(path, mesh=mesh, dtype=overrides.get("param_dtype"))
    if overrides:
        config = config.replace(**overrides)
    lm = LM(_with_context(config, max_context), params, _tokenizer(tokenizer, path), mesh)
    lm.source_dir = path
    return _quantize(lm, quant, quant_group_size)


__all__ = ["QUANT_MODES", "init", "load"]
