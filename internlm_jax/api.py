"""The notebook-facing API: `ij.load`, `ij.init`, and the `LM` object (logits, generate, chat, save)."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from internlm_jax import model as model_lib
from internlm_jax.config import ConfigError, ModelConfig, PRESETS, get_preset
from internlm_jax.sampling import sample
from internlm_jax.sharding import named_sharding, tree_shardings, use_mesh


@dataclasses.dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos / stop token / stop string) or "length"
    prompt_tokens: int
    stop_token_id: int | None = None  # the stop token that ended generation (not in token_ids), if any


def _bucket(n: int, minimum: int = 16) -> int:
    """Round a length up to a power of two (>= minimum) so varied prompts share a few compiled shapes."""
    b = minimum
    while b < n:
        b *= 2
    return b


def context_limit(config: ModelConfig) -> int:
    """Longest sequence the model is meant to see: max_position_embeddings, times the NTK factor if any."""
    if config.rope_scaling is not None:
        return int(config.max_position_embeddings * max(config.rope_scaling[1], 1.0))
    return config.max_position_embeddings


class LM:
    """A loaded InternLM2: config, params, tokenizer (optional), and a mesh (optional)."""

    def __init__(self, config: ModelConfig, params: Any, tokenizer: Any = None, mesh: Mesh | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh

    def __repr__(self) -> str:
        c = self.config
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return (f"LM(D={c.hidden_size}, L={c.num_layers}, N={c.num_heads}, K={c.num_kv_heads}, V={c.vocab_size}, "
                f"params={n / 1e6:.1f}M, dtype={c.dtype}, tokenizer={'yes' if self.tokenizer else 'no'})")

    # ---- jitted pieces (cached per config, which is hashable) ------------------------------------
    @functools.cached_property
    def _forward(self):
        return jax.jit(model_lib.forward, static_argnames=("config", "return_hidden"))

    def _run(self, fn, *args, **kwargs):
        with use_mesh(self.mesh):
            return fn(*args, **kwargs)

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer: pass token ids, or load from a folder with "
                              "tokenizer.model and tokenizer_config.json (ij.load(path, tokenizer=DIR))")
        return self.tokenizer

    def _encode(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(list(self._need_tokenizer().encode(p, add_bos=True)))
            else:
                ids = [int(t) for t in p]
                bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
                if bad:
                    raise ConfigError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
                out.append(ids)
        if not out or any(len(p) == 0 for p in out):
            raise ConfigError("empty prompt: give at least one token (a string prompt gets BOS automatically)")
        return out

    # ---- public API --------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[Sequence[int]] | Sequence[int]) -> list[np.ndarray] | np.ndarray:
        """fp32 logits [T, V] per sequence (a list for a batch; one array for a single list of ids)."""
        single = len(token_ids) > 0 and isinstance(token_ids[0], (int, np.integer))
        seqs = self._encode([token_ids] if single else token_ids)
        limit = context_limit(self.config)
        longest = max(len(s) for s in seqs)
        if longest > limit:
            raise ConfigError(f"sequence of {longest} tokens exceeds the model's context of {limit} tokens")
        t = _bucket(longest)
        tokens = np.full((len(seqs), t), self.config.pad_token_id, np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s  # right padding: causal attention keeps real tokens blind to it
        logits, _ = self._run(self._forward, self.params, jnp.asarray(tokens), config=self.config)
        logits = np.asarray(logits)
        out = [logits[i, : len(s)] for i, s in enumerate(seqs)]
        return out[0] if single else out

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop: Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                 return_details: bool = False) -> list[str] | list[Generation]:
        """Batched, KV-cached generation. Greedy at temperature 0. Stops on EOS, stop ids, or stop strings."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ConfigError(f"invalid sampling: temperature={temperature} (>= 0), top_p={top_p} (0 < p <= 1), "
                              f"top_k={top_k} (>= 0)")
        seqs = self._encode(prompts)
        limit = context_limit(self.config)
        longest = max(len(s) for s in seqs)
        if longest + max_new_tokens > limit:
            raise ConfigError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                              f"context of {limit} tokens; shorten the prompt or lower max_new_tokens")
        stops = set(stop_token_ids or [])
        stops.add(self.config.eos_token_id)
        if self.tokenizer is not None:
            im_end = getattr(self.tokenizer, "im_end_id", None)
            if im_end is not None:
                stops.add(int(im_end))
        b = len(seqs)
        tp = _bucket(longest)
        new = _bucket(max_new_tokens, 8)
        tokens = np.full((b, tp), self.config.pad_token_id, np.int32)
        positions = np.full((b, tp), -1, np.int32)
        for i, s in enumerate(seqs):  # left padding; padded slots get position -1 and are never attended
            tokens[i, tp - len(s):] = s
            positions[i, tp - len(s):] = np.arange(len(s))
        stop_arr = np.full((max(8, _bucket(len(stops), 8)),), -1, np.int32)
        stop_arr[: len(stops)] = sorted(stops)
        out = self._run(_generate_jit, self.params, jnp.asarray(tokens), jnp.asarray(positions),
                        jax.random.key(seed), jnp.asarray(stop_arr), jnp.float32(temperature),
                        jnp.float32(top_p), jnp.int32(top_k), config=self.config, max_new=new,
                        cache_len=tp + new)
        out = np.asarray(out)[:, :max_new_tokens]
        results = []
        for i, s in enumerate(seqs):
            ids = out[i].tolist()
            reason, stopped_on = "length", None
            for j, t in enumerate(ids):
                if t in stops:
                    ids, reason, stopped_on = ids[:j], "stop", int(t)
                    break
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
            if stop and self.tokenizer is not None:
                cut = min((text.find(x) for x in stop if x and x in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
            results.append(Generation(text, ids, reason, len(s), stopped_on))
        return results if return_details else [r.text for r in results]

    def chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
             max_new_tokens: int = 256, **kwargs: Any) -> dict[str, Any]:
        """One assistant turn: {"role": "assistant", "content": str, "tool_calls": [...] (if any)}."""
        from internlm_jax import chat as chat_lib

        tok = self._need_tokenizer()
        prompt = chat_lib.render(list(messages), tools=tools, add_generation_prompt=True)
        ids = tok.encode(prompt, add_bos=False)  # the template already starts with <s>
        stop_ids = [tok.im_end_id]
        if tools:
            stop_ids.append(tok.token_id("<|action_end|>"))
        gen = self.generate([ids], max_new_tokens, stop_token_ids=stop_ids, return_details=True, **kwargs)[0]
        text = tok.decode(gen.token_ids)
        if gen.finish_reason == "stop" and tools and gen.token_ids != [] and len(gen.token_ids) < max_new_tokens:
            text = text + "<|action_end|>" if "<|action_start|>" in text and "<|action_end|>" not in text else text
        content, tool_calls = chat_lib.parse_completion(text)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            msg["tool_calls"] = tool_calls
        return msg

    def save(self, path: str | os.PathLike, tokenizer_dir: str | None = None) -> None:
        """Write an HF InternLM2 folder (config.json, sharded safetensors, tokenizer files)."""
        from internlm_jax.checkpoint.hf import save_hf

        if tokenizer_dir is None and self.tokenizer is not None:
            tokenizer_dir = getattr(self.tokenizer, "source_dir", None)
        save_hf(path, self.params, self.config, tokenizer_dir=tokenizer_dir)


@functools.partial(jax.jit, static_argnames=("config", "max_new", "cache_len"))
def _generate_jit(params, tokens, positions, key, stop_ids, temperature, top_p, top_k, *, config: ModelConfig,
                  max_new: int, cache_len: int):
    """Prefill the left-padded prompts, then decode `max_new` tokens with a while loop that ends when every
    row has produced a stop token."""
    b = tokens.shape[0]
    cache = model_lib.init_cache(config, b, cache_len)
    logits, cache = model_lib.forward(params, tokens, positions, config=config, cache=cache)
    temp = jnp.full((b,), temperature)
    tp_ = jnp.full((b,), top_p)
    tk = jnp.full((b,), top_k)
    next_pos = positions[:, -1] + 1
    key, sub = jax.random.split(key)
    first = sample(logits[:, -1], sub, temp, tk, tp_)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def cond(state):
        i, _, _, _, _, done, _ = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        i, cache, tok, pos, out, done, key = state
        logits, cache = model_lib.forward(params, tok[:, None], pos[:, None], config=config, cache=cache)
        key, sub = jax.random.split(key)
        nxt = sample(logits[:, -1], sub, temp, tk, tp_)
        nxt = jnp.where(done, stop_ids[0], nxt)
        out = out.at[:, i].set(nxt)
        done = done | jnp.isin(nxt, stop_ids)
        return i + 1, cache, nxt, pos + 1, out, done, key

    state = (jnp.int32(1), cache, first, next_pos, out, done, key)
    _, _, _, _, out, done, _ = jax.lax.while_loop(cond, body, state)
    return out


# ---- loading -------------------------------------------------------------------------------------------
def _place(params: Any, config: ModelConfig, mesh: Mesh | None) -> Any:
    if mesh is None:
        return params
    shardings = tree_shardings(mesh, model_lib.param_axes(config), params)
    return jax.device_put(params, shardings)


def init(preset: str | ModelConfig = "internlm2-tiny", seed: int = 0, *, dtype: str | None = None,
         mesh: Mesh | None = None, tokenizer: Any = None, **overrides: Any) -> LM:
    """Random weights for a preset (or a ModelConfig): for tests, demos and shape checks."""
    config = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    if dtype is not None:
        overrides.setdefault("dtype", dtype)
        overrides.setdefault("param_dtype", dtype)
    if overrides:
        config = config.replace(**overrides)
    if mesh is not None:
        shardings = tree_shardings(mesh, model_lib.param_axes(config), model_lib.param_shapes(config))
        params = jax.jit(model_lib.init_params, static_argnums=0, out_shardings=shardings)(config, jax.random.key(seed))
    else:
        params = jax.jit(model_lib.init_params, static_argnums=0)(config, jax.random.key(seed))
    if isinstance(tokenizer, (str, os.PathLike)):
        from internlm_jax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(tokenizer)
    return LM(config, params, tokenizer, mesh)


def load(path_or_preset: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
         tokenizer: str | os.PathLike | Any | None = None, **overrides: Any) -> LM:
    """Load an InternLM2 HF folder or one of our orbax checkpoints (optionally onto a mesh).

    `dtype` sets both the compute and the storage dtype ("bfloat16" halves memory); other ModelConfig fields
    (remat, attention_impl, ...) can be overridden by keyword.
    """
    path = os.fspath(path_or_preset)
    if dtype is not None:
        overrides.setdefault("dtype", dtype)
        overrides.setdefault("param_dtype", dtype)
    if not os.path.exists(path):
        if path in PRESETS:
            raise ConfigError(
                f"{path!r} is a model preset, not a checkpoint: no weights come with it. Download the HF "
                f"checkpoint folder (config.json, tokenizer.model, *.safetensors) and call ij.load('/path/to/{path}'), "
                f"or use ij.init({path!r}) for random weights.")
        raise ConfigError(f"no checkpoint at {path!r}: give an InternLM2 HF folder (with config.json) or an "
                          f"internlm-jax orbax checkpoint folder")
    from internlm_jax.quant.io import is_quantized_checkpoint, load_quantized_lm

    if is_quantized_checkpoint(path):  # `internlm-jax quantize` output: int4 weights + manifest
        lm = load_quantized_lm(path, tokenizer=tokenizer)
        if mesh is not None:
            raise ConfigError("loading a quantized checkpoint onto a mesh is not supported yet; load it on one "
                              "device, or load the original weights with mesh=... and quantize")
        return LM(lm.config.replace(**overrides) if overrides else lm.config, lm.params, lm.tokenizer, None)
    if os.path.exists(os.path.join(path, "config.json")):
        from internlm_jax.checkpoint.hf import load_hf

        config, params = load_hf(path, dtype=overrides.get("param_dtype"), mesh=mesh)
    else:
        from internlm_jax.checkpoint.orbax_io import restore_params

        config, params = restore_params(path, mesh=mesh, dtype=overrides.get("param_dtype"))
    if overrides:
        config = config.replace(**overrides)
    tok_dir = tokenizer if tokenizer is not None else path
    tok = None
    if isinstance(tok_dir, (str, os.PathLike)):
        if os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
            from internlm_jax.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(tok_dir)
        elif tokenizer is not None:
            raise ConfigError(f"no tokenizer.model in {tok_dir!r}")
    else:
        tok = tok_dir
    return LM(config, params, tok, mesh)


def shard_batch(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """Place a [B, ...] host batch over the mesh's batch axes."""
    return jax.device_put(x, named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape))
