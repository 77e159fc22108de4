"""Per-request sampling parameters and the sampler, vectorised over the rows of a step.

Every parameter is a per-row array, so one compiled step serves any mix of requests. Order of operations
per row (as in vLLM/HF): penalties on the raw logits (repetition on prompt+output tokens, presence and
frequency on output tokens), then greedy (temperature 0) or temperature -> top-k -> top-p -> min-p ->
categorical draw (Gumbel-max; the filters find their thresholds by bisection, so nothing sorts the vocab).
The noise of a row is a hash of (seed, number of tokens generated so far, token id), so a seeded request
gives the same tokens whatever else shares the batch. Reported logprobs are those of the raw
model distribution (log_softmax of the logits before penalties and temperature).

Constrained decoding (`SamplingParams.grammar`, see internlm_jax.grammar): each row brings a packed mask of
allowed tokens (int32 words, 32 tokens each; all ones for a free row); disallowed tokens get -inf after the
penalties, so greedy is the argmax within the mask and a draw never leaves it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from internlm_jax.config import ConfigError

if TYPE_CHECKING:
    from internlm_jax.grammar import GrammarSpec

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs; always computed, returned when asked for


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. Defaults follow the OpenAI API (temperature 1, 16 tokens)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style: divides positive / multiplies negative logits of seen tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer / decode_fn on the engine)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's logprob and the top k
    grammar: GrammarSpec | None = None  # constrained decoding: the output must match this grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ConfigError("presence_penalty and frequency_penalty must be in [-2, 2], got "
                              f"{self.presence_penalty} and {self.frequency_penalty}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        if self.grammar is not None:
            from internlm_jax.grammar import GrammarSpec
            if not isinstance(self.grammar, GrammarSpec):
                raise ConfigError(f"grammar must be an internlm_jax.grammar.GrammarSpec, got {self.grammar!r:.80}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters of one step (host numpy when built, device arrays inside the step)."""

    temperature: Float[Array, "B"]
    top_k: Int[Array, "B"]
    top_p: Float[Array, "B"]
    min_p: Float[Array, "B"]
    repetition: Float[Array, "B"]
    presence: Float[Array, "B"]
    frequency: Float[Array, "B"]
    seed: Int[Array, "B"]  # uint32
    counter: Int[Array, "B"]  # tokens generated so far: the fold-in of the row's key

    @staticmethod
    def build(rows: Sequence[tuple[SamplingParams, int, int]], batch: int) -> "SamplingArrays":
        """From (params, seed, counter) per row, padded to `batch` rows with greedy dummies."""
        def col(fn, dtype, pad):
            out = np.full((batch,), pad, dtype)
            for i, r in enumerate(rows):
                out[i] = fn(r)
            return out
        return SamplingArrays(
            temperature=col(lambda r: r[0].temperature, np.float32, 0.0),
            top_k=col(lambda r: r[0].top_k, np.int32, 0),
            top_p=col(lambda r: r[0].top_p, np.float32, 1.0),
            min_p=col(lambda r: r[0].min_p, np.float32, 0.0),
            repetition=col(lambda r: r[0].repetition_penalty, np.float32, 1.0),
            presence=col(lambda r: r[0].presence_penalty, np.float32, 0.0),
            frequency=col(lambda r: r[0].frequency_penalty, np.float32, 0.0),
            seed=col(lambda r: r[1] & 0xFFFFFFFF, np.uint32, 0),
            counter=col(lambda r: r[2], np.int32, 0),
        )


class SampleOut(NamedTuple):
    tokens: Int[Array, "B"]
    logprobs: Float[Array, "B"]
    top_ids: Int[Array, "B M"]
    top_logprobs: Float[Array, "B M"]


def apply_penalties(logits: Float[Array, "B V"], counts: Int[Array, "B V"], prompt_mask: Bool[Array, "B V"],
                    p: SamplingArrays) -> Float[Array, "B V"]:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties."""
    seen = prompt_mask | (counts > 0)
    rep = p.repetition[:, None]
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen & (rep != 1.0), penalised, logits)
    c = counts.astype(jnp.float32)
    return logits - p.presence[:, None] * (c > 0) - p.frequency[:, None] * c


_BISECT_STEPS = 32  # halvings of the threshold interval: below fp32 resolution of the logit/prob range


def _bisect(lo: Float[Array, "B"], hi: Float[Array, "B"], ok) -> Float[Array, "B"]:
    """The largest t in [lo, hi] with ok(t) (ok is monotone: true at lo, false above the answer), per row."""
    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)
    lo, _ = jax.lax.fori_loop(0, _BISECT_STEPS, body, (lo, hi))
    return lo


def filter_logits(logits: Float[Array, "B V"], p: SamplingArrays) -> Float[Array, "B V"]:
    """Temperature-scaled logits with top-k, top-p and min-p losers at -inf.

    No sort: top-k keeps logits >= the largest threshold that still leaves k of them, top-p keeps probs >=
    the largest threshold whose kept mass still reaches p (over the top-k survivors, as HF orders them);
    both thresholds are found by bisection. Ties at a threshold are all kept (as in HF's top-k).
    """
    V = logits.shape[-1]
    x = logits / jnp.maximum(p.temperature, 1e-5)[:, None]
    top = jnp.max(x, axis=-1)
    low = jnp.min(jnp.where(jnp.isfinite(x), x, top[:, None]), axis=-1)  # lowest allowed (unmasked) logit
    k = jnp.where(p.top_k <= 0, V, jnp.minimum(p.top_k, V)).astype(jnp.float32)
    count_ok = lambda t: jnp.sum(x >= t[:, None], axis=-1) >= k  # noqa: E731
    # lo = min(x) - 1 always satisfies count_ok (k above the allowed count keeps every allowed token); the result is the k-th largest logit (to fp32 precision)
    kth = _bisect(low - 1.0, top, count_ok)
    kth = jnp.where(p.top_k <= 0, -jnp.inf, kth)
    x = jnp.where(x >= kth[:, None], x, -jnp.inf)
    probs = jax.nn.softmax(x, axis=-1)  # renormalised over the top-k survivors
    mass_ok = lambda t: jnp.sum(jnp.where(probs >= t[:, None], probs, 0.0), axis=-1) >= p.top_p  # noqa: E731
    cut = _bisect(jnp.zeros_like(top), jnp.max(probs, axis=-1), mass_ok)
    cut = jnp.where(p.top_p >= 1.0, 0.0, cut)
    keep = (probs >= cut[:, None]) & (probs >= p.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True))
    return jnp.where(keep, x, -jnp.inf)


def _mix32(x: Array) -> Array:
    """A 32-bit integer finaliser (lowbias32): every input bit flips each output bit with ~1/2 probability."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: Int[Array, "B"], counter: Int[Array, "B"], V: int) -> Float[Array, "B V"]:
    """Gumbel(0, 1) noise that is a pure function of (seed, counter, token id).

    A counter-based hash instead of jax.random: the same numbers on every backend and batch layout, a
    handful of integer ops per element (threefry over a 92k vocabulary per row per step is far slower, and
    slow to compile). 24 random bits per element give uniforms in (0, 1) exclusive.
    """
    row = _mix32(seed.astype(jnp.uint32) ^ _mix32(counter.astype(jnp.uint32) + jnp.uint32(0x9E3779B9)))
    bits = _mix32(row[:, None] ^ (jnp.arange(V, dtype=jnp.uint32)[None, :] * jnp.uint32(0x85EBCA6B)))
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    return -jnp.log(-jnp.log(u))


def mask_words(vocab_size: int) -> int:
    """int32 words of a packed token mask over `vocab_size` tokens."""
    return -(-vocab_size // 32)


def unpack_bitmask(words: Int[Array, "B W"], vocab_size: int) -> Bool[Array, "B V"]:
    """Packed masks -> bool [B, V]: token 32w + j is allowed iff bit j of word w is set."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=words.dtype)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size] != 0


def sample(logits: Float[Array, "B V"], counts: Int[Array, "B V"], prompt_mask: Bool[Array, "B V"],
           p: SamplingArrays, allowed: Bool[Array, "B V"] | None = None) -> SampleOut:
    """One token per row, with its raw logprob and the top MAX_TOP_LOGPROBS raw logprobs.

    allowed: the tokens each row may produce (constrained decoding); None = all."""
    logits = logits.astype(jnp.float32)
    raw_lp = jax.nn.log_softmax(logits, axis=-1)
    pen = apply_penalties(logits, counts, prompt_mask, p)
    if allowed is not None:
        pen = jnp.where(allowed, pen, -jnp.inf)
    greedy = jnp.argmax(pen, axis=-1).astype(jnp.int32)

    def stochastic(_):
        filtered = filter_logits(pen, p)
        drawn = jnp.argmax(filtered + gumbel_noise(p.seed, p.counter, filtered.shape[-1]), axis=-1)
        drawn = drawn.astype(jnp.int32)  # Gumbel-max: argmax(logits + Gumbel noise) is a categorical draw
        return jnp.where(p.temperature > 0, drawn, greedy)

    # The filters are skipped when every row of the step is greedy.
    tokens = jax.lax.cond(jnp.any(p.temperature > 0), stochastic, lambda _: greedy, None)
    lp = jnp.take_along_axis(raw_lp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(raw_lp, min(MAX_TOP_LOGPROBS, raw_lp.shape[-1]))
    return SampleOut(tokens, lp, top_ids.astype(jnp.int32), top_lp)
