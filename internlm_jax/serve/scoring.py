"""Prompt logprobs for `/v1/completions` with `echo` + `logprobs` (what lm-eval's local-completions needs).

The engine only scores the tokens it samples, so the prompt's own logprobs come from one uncached forward
of the model (the same pure `forward`, on the engine's already placed params). Shapes are bucketed (rows
1 or `batch`, length a power of two >= 16) so few programs exist; the output head runs in length chunks so
only [B, chunk, V] logits are live (V = 92544 for InternLM2). Right padding cannot change a score:
attention is causal by index and pads sit after the real tokens at position -1 (each row's dynamic-NTK
rotation is then that of its own true length).

Each compiled shape is counted (`compiles`); `warmup()` compiles them all up front when asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from internlm_jax import model as model_lib
from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.layers import linear
from internlm_jax.sharding import use_mesh

TOP_K = 5  # OpenAI completions allow logprobs 0..5


@dataclasses.dataclass
class PromptLogprobs:
    """Per prompt token: log p(token | tokens before it) and the top TOP_K alternatives; None for token 0."""

    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


def _chunk(t: int) -> int:
    c = 1
    while c < 128 and t % (c * 2) == 0:
        c *= 2
    return c


@functools.partial(jax.jit, static_argnames=("config", "k"))
def prompt_logprobs(params: Any, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], *, config: ModelConfig,
                    k: int) -> tuple[Float[Array, "B T"], Float[Array, "B T K"], Int[Array, "B T K"]]:
    """Entry t: log p(tokens[b, t+1] | tokens[b, :t+1]) and the top-k next-token logprobs after position t."""
    hidden, _ = model_lib.forward(params, tokens, positions, config=config, return_hidden=True)  # [B, T, D]
    B, T, D = hidden.shape
    targets = jnp.roll(tokens, -1, axis=1)  # the last column is junk (no next token)
    c = _chunk(T)
    hc = hidden.reshape(B, T // c, c, D).swapaxes(0, 1)  # [T/c, B, c, D]
    tc = targets.reshape(B, T // c, c).swapaxes(0, 1)

    def one(args):
        h, t = args
        logits = linear(h, params["output"], "D", "V", jnp.dtype(config.dtype)).astype(jnp.float32)  # [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # log_softmax in fp32: logit - logsumexp
        tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse[..., 0]
        top_v, top_i = jax.lax.top_k(logits, k)
        return tgt, top_v - lse, top_i.astype(jnp.int32)

    lp, top_lp, top_ids = jax.lax.map(one, (hc, tc))
    return (lp.swapaxes(0, 1).reshape(B, T), top_lp.swapaxes(0, 1).reshape(B, T, k),
            top_ids.swapaxes(0, 1).reshape(B, T, k))


def _bucket(n: int, limit: int) -> int:
    b = 16
    while b < n:
        b *= 2
    return min(b, max(limit, 16)) if n <= limit else b


class PromptScorer:
    """Thread-safe (one forward at a time); call `score` from a worker thread, not the event loop."""

    def __init__(self, params: Any, config: ModelConfig, *, max_len: int, mesh: Any = None, batch: int = 4):
        self.params, self.config, self.mesh = params, config, mesh
        self.max_len, self.batch = int(max_len), int(batch)
        self._lock = threading.Lock()
        self._shapes: set[tuple[int, int]] = set()
        self.compiles = 0
        self.compiles_after_warmup = 0  # shapes compiled on the request path (0 once warmed up)
        self.warm = False
        self.forwards = 0

    def shapes(self) -> list[tuple[int, int]]:
        lengths, b = [], 16
        while True:
            lengths.append(min(b, self.max_len) if self.max_len >= 16 else 16)
            if b >= self.max_len:
                break
            b *= 2
        rows = sorted({1, self.batch})
        return [(r, t) for r in rows for t in sorted(set(lengths))]

    def warmup(self) -> None:
        """Compile every (rows, length) bucket now, so no prompt-logprob request compiles."""
        for rows, t in self.shapes():
            self._run(np.zeros((rows, t), np.int32), np.zeros((rows, t), np.int32))
        self.warm = True

    def _run(self, tokens: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shape = tokens.shape
        if shape not in self._shapes:
            self._shapes.add(shape)
            self.compiles += 1
            self.compiles_after_warmup += self.warm
        with use_mesh(self.mesh):
            out = prompt_logprobs(self.params, tokens, positions, config=self.config, k=TOP_K)
        self.forwards += 1
        return tuple(np.asarray(x) for x in out)  # type: ignore[return-value]

    def score(self, prompts: Sequence[Sequence[int]]) -> list[PromptLogprobs]:
        for p in prompts:
            if not p:
                raise ConfigError("cannot score an empty prompt")
            if len(p) > self.max_len:
                raise ConfigError(f"a prompt of {len(p)} tokens exceeds the context of {self.max_len} tokens")
        out: list[PromptLogprobs | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        with self._lock:
            for s in range(0, len(order), self.batch):
                idx = order[s: s + self.batch]
                t = _bucket(max(len(prompts[i]) for i in idx), self.max_len)
                rows = 1 if len(idx) == 1 else self.batch
                tokens = np.full((rows, t), self.config.pad_token_id, np.int32)
                positions = np.full((rows, t), -1, np.int32)  # pads at position -1 (see the module doc)
                for r, i in enumerate(idx):
                    tokens[r, : len(prompts[i])] = prompts[i]
                    positions[r, : len(prompts[i])] = np.arange(len(prompts[i]))
                lp, top_lp, top_ids = self._run(tokens, positions)
                for r, i in enumerate(idx):
                    n = len(prompts[i])
                    out[i] = PromptLogprobs(
                        [None] + [float(v) for v in lp[r, : n - 1]],
                        [None] + [[(int(a), float(b)) for a, b in zip(top_ids[r, j], top_lp[r, j])]
                                  for j in range(n - 1)])
        return out  # type: ignore[return-value]


__all__ = ["TOP_K", "PromptLogprobs", "PromptScorer", "prompt_logprobs"]
