"""The notebook-facing API: the `LM` object (logits, generate, chat, save). `ij.load` / `ij.init` live in
`internlm_jax.loading`.

`LM.generate` runs on the serving engine (`internlm_jax.engine`): the same forward, sampler and seeds as the
server, so a prompt, seed and sampling settings give the same tokens in a notebook as over HTTP.
"""

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
from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.sharding import named_sharding, use_mesh


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


def trained_context(config: ModelConfig) -> int:
    """The context the model was trained for: max_position_embeddings, times the RoPE scaling factor if any."""
    if config.rope_scaling is not None:
        return int(config.max_position_embeddings * max(config.rope_scaling[1], 1.0))
    return config.max_position_embeddings


def context_limit(config: ModelConfig) -> int:
    """Longest sequence the model may see: `max_context` when set (ij.load(..., max_context=N)), else the
    trained context."""
    return config.max_context if config.max_context is not None else trained_context(config)


class LM:
    """A loaded InternLM2: config, params, tokenizer (optional), and a mesh (optional)."""

    def __init__(self, config: ModelConfig, params: Any, tokenizer: Any = None, mesh: Mesh | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.source_dir: str | None = None  # the checkpoint folder it was loaded from (save copies its extras)
        self._engine: Any = None

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

    def _check_context(self, n: int, what: str) -> None:
        limit = context_limit(self.config)
        if n > limit:
            raise ConfigError(f"{what} of {n} tokens exceeds the model's context of {limit} tokens; shorten it, or "
                              f"allow more with ij.load(path, max_context=N) (beyond {trained_context(self.config)}"
                              " tokens the model extrapolates)")

    # ---- public API --------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[Sequence[int]] | Sequence[int], positions: str = "all"
               ) -> list[np.ndarray] | np.ndarray:
        """fp32 logits per sequence (a list for a batch; one array for a single list of ids): [T, V] with
        positions="all"; [V] after the last token with positions="last", computed in chunks with memory
        bounded by the chunk (for long contexts: 200K x 92544 fp32 logits would be 74 GB)."""
        if positions not in ("all", "last"):
            raise ConfigError(f"positions must be 'all' or 'last', got {positions!r}")
        single = len(token_ids) > 0 and isinstance(token_ids[0], (int, np.integer))
        seqs = self._encode([token_ids] if single else token_ids)
        longest = max(len(s) for s in seqs)
        self._check_context(longest, "a sequence")
        if positions == "last":
            out = [self.score(s).last_logits for s in seqs]
            return out[0] if single else out
        t = _bucket(longest)
        tokens = np.full((len(seqs), t), self.config.pad_token_id, np.int32)
        positions = np.full((len(seqs), t), -1, np.int32)
        for i, s in enumerate(seqs):
            # Right padding, at position -1: causal attention keeps real tokens blind to it, and each row's
            # rotary length (dynamic NTK) is its own true length, never the padded bucket's.
            tokens[i, : len(s)] = s
            positions[i, : len(s)] = np.arange(len(s))
        logits, _ = self._run(self._forward, self.params, jnp.asarray(tokens), jnp.asarray(positions),
                              config=self.config)
        logits = np.asarray(logits)
        out = [logits[i, : len(s)] for i, s in enumerate(seqs)]
        return out[0] if single else out

    def score(self, text_or_ids: str | Sequence[int], *, top_k: int = 0, chunk: int = 512) -> Any:
        """Per-token logprobs of one sequence (`scoring.TokenScores`: token_logprobs[i] = log p(token i+1 |
        tokens <= i), greedy flags, optional top-k, logits after the last token), computed in chunks of
        `chunk` tokens: memory grows with the chunk, not with T x vocab. A string gets BOS."""
        from internlm_jax.scoring import score_tokens

        ids = self._encode([text_or_ids])[0]
        self._check_context(len(ids), "a sequence")
        return self._run(score_tokens, self.params, self.config, ids, chunk=chunk, top_k=top_k)

    def engine(self, slots: int = 1, max_len: int = 0) -> Any:
        """The engine `generate` runs on, sized for at least `slots` sequences of `max_len` tokens (grown,
        never shrunk; it follows `lm.params` when they are replaced)."""
        from internlm_jax.engine import Engine, EngineConfig

        eng = self._engine
        if eng is not None and eng.params_source is not self.params:
            try:
                eng.update_params(self.params)
            except ConfigError:  # another weight type (e.g. quantized since): build a new engine
                eng = self._engine = None
        if (eng is None or eng.config != self.config or eng.engine_config.max_num_seqs < slots
                or eng.max_model_len < max_len):
            slots = max(slots, eng.engine_config.max_num_seqs if eng is not None else 1)
            max_len = max(max_len, eng.max_model_len if eng is not None else 0)
            slots, max_len = _bucket(slots, 1), _bucket(max_len, 64)
            page = 16
            ec = EngineConfig(page_size=page, num_pages=slots * -(-max_len // page), max_num_seqs=slots,
                              max_model_len=max_len, max_num_batched_tokens=max(512, 2 * slots),
                              max_prefill_rows=min(4, slots), warmup=False,
                              eos_token_ids=(self.config.eos_token_id,))
            self._engine = eng = Engine(self.params, self.config, ec, tokenizer=self.tokenizer, mesh=self.mesh)
        return eng

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop: Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                 return_details: bool = False, **sampling: Any) -> list[str] | list[list[int]] | list[Generation]:
        """Batched generation on the engine. Greedy at temperature 0. Stops on EOS (and `<|im_end|>` when the
        tokenizer has it), stop ids, or stop strings. Every prompt is sampled with `seed`, as a server request
        with that seed would be. Other `SamplingParams` fields (min_p, repetition_penalty, ...) pass through.
        Returns texts, or token-id lists when the model has no tokenizer (or `Generation`s with details)."""
        from internlm_jax.sampling import SamplingParams

        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        seqs = self._encode(prompts)
        longest = max(len(s) for s in seqs)
        self._check_context(longest + max_new_tokens, f"a prompt of {longest} tokens + max_new_tokens")
        stops = set(int(t) for t in (stop_token_ids or []))
        im_end = getattr(self.tokenizer, "im_end_id", None)
        if not sampling.get("ignore_eos", False):
            stops.update(int(t) for t in (self.config.eos_token_id, im_end) if t is not None)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop_token_ids=tuple(sorted(stops)),
                                stop=tuple(stop or ()) if self.tokenizer is not None else (), **sampling)
        outs = self._run(self.engine(len(seqs), longest + max_new_tokens).generate, seqs, params)
        results = []
        for s, out in zip(seqs, outs):
            ids = list(out.outputs[0].token_ids)
            reason = out.outputs[0].finish_reason or "length"
            stopped_on = None
            if ids and ids[-1] in stops and reason == "stop":
                stopped_on = ids.pop()
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
            if stop and self.tokenizer is not None:
                cut = min((text.find(x) for x in stop if x and x in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
            results.append(Generation(text, ids, reason, len(s), stopped_on))
        if return_details:
            return results
        return [r.text for r in results] if self.tokenizer is not None else [r.token_ids for r in results]

    def chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
             max_new_tokens: int = 256, *, trusted: bool = False, **kwargs: Any) -> dict[str, Any]:
        """One assistant turn: {"role": "assistant", "content": str, "tool_calls": [...] (if any)}.

        Message content is text: special-token strings typed in it stay text (no forged turns) unless
        `trusted=True`."""
        from internlm_jax import chat as chat_lib

        tok = self._need_tokenizer()
        ids = chat_lib.encode_chat(tok, list(messages), tools=tools, add_generation_prompt=True, trusted=trusted)
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
        """Write an HF InternLM2 folder (config.json, sharded safetensors, tokenizer files), with the source
        folder's tokenizer and remote-code files when it was loaded from one."""
        from internlm_jax.checkpoint.hf import save_hf

        if tokenizer_dir is None and self.tokenizer is not None:
            tokenizer_dir = getattr(self.tokenizer, "source_dir", None)
        source = self.source_dir if self.source_dir and os.path.exists(os.path.join(self.source_dir, "config.json")) \
            else None  # an HF folder (orbax and int4 checkpoints have no tokenizer or remote code to carry)
        save_hf(path, self.params, self.config, tokenizer_dir=tokenizer_dir, source_dir=source)


def shard_batch(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """Place a [B, ...] host batch over the mesh's batch axes."""
    return jax.device_put(x, named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape))

