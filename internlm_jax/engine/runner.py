"""The device side of the engine: the page pool and sampler state, fixed-shape buckets compiled ahead of
time, and one call per bucket per step.

A step call takes a [B, T] token block (rows = sequences, T = 1 for decodes, a chunk bucket for prefills)
and page tables [B, W]; B, T and W are rounded up to configured buckets, so the set of executables is fixed
and compiled at warm-up (`jit(...).lower(...).compile()`, nothing executed). Any executable needed later is
counted in `compiles_after_warmup`; in addition every XLA backend compile that happens on the stepping
thread after warm-up is counted by a jax.monitoring listener, which also catches stray eager jnp ops on the
request path. Both must stay 0.

Constrained rows (a grammar in their SamplingParams) bring a packed token mask, int32 [B, ceil(V/32)],
computed on the host from each row's grammar matcher just before the call (llguidance, several rows in
parallel) and passed as a third input of fixed shape per bucket; a step without constrained rows reuses a
device-resident all-ones mask (nothing extra is transferred).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.engine.scheduler import Row
from internlm_jax.grammar import fill_bitmasks
from internlm_jax.kv_cache import PagedCache, resolve_kv_dtype
from internlm_jax.model import forward, param_axes
from internlm_jax.sampling import MAX_TOP_LOGPROBS, SamplingArrays, mask_words, sample, unpack_bitmask
from internlm_jax.sharding import named_sharding, tree_shardings, use_mesh

# ---- backend compiles per thread (jax.monitoring) --------------------------------------------------
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
BACKEND_COMPILES: collections.Counter[int] = collections.Counter()
_listener_lock = threading.Lock()
_listener_installed = False


def _on_duration_event(event: str, duration: float, *args: Any, **kwargs: Any) -> None:
    if event == _COMPILE_EVENT:
        BACKEND_COMPILES[threading.get_ident()] += 1


def install_compile_listener() -> None:
    global _listener_installed
    with _listener_lock:
        if not _listener_installed:
            jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
            _listener_installed = True


class DeviceState(NamedTuple):
    """Everything the step mutates on device (donated each call)."""

    k: jax.Array  # [L, P, S, K, H]
    v: jax.Array
    k_scale: jax.Array | None  # [L, P, S, K] for an int8 pool
    v_scale: jax.Array | None
    counts: jax.Array  # [slots + 1, V] int32: generated-token counts per slot (row `slots` = padding)
    prompt_mask: jax.Array  # [slots + 1, V] bool: prompt tokens per slot (repetition penalty)


class StepInputs(NamedTuple):
    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32, -1 = padding
    page_table: jax.Array  # [B, W] int32
    lengths: jax.Array  # [B] int32, tokens already cached
    rope_len: jax.Array  # [B] int32, the prompt's length: the rotation a chunked prefill must cover
    last_idx: jax.Array  # [B] int32, index in T of the token whose logits are sampled
    slots: jax.Array  # [B] int32 (padding rows: the spare slot)
    do_sample: jax.Array  # [B] bool
    sampling: SamplingArrays


# Host->device traffic per step is two arrays (a few small transfers cost more than the whole step on a
# busy CPU host): ints [B, 2T + W + 8] and floats [B, 6], unpacked inside the executable.
_N_INT_COLS = 8  # lengths, last_idx, slots, do_sample, top_k, seed (bits), counter, rope_len
_N_FLOAT_COLS = 6  # temperature, top_p, min_p, repetition, presence, frequency


def pack_inputs(inp: StepInputs) -> tuple[np.ndarray, np.ndarray]:
    s = inp.sampling
    ints = np.concatenate([inp.tokens, inp.positions, inp.page_table, np.stack([
        inp.lengths, inp.last_idx, inp.slots, inp.do_sample.astype(np.int32), s.top_k,
        s.seed.astype(np.uint32).view(np.int32), s.counter, inp.rope_len], axis=1)], axis=1).astype(np.int32)
    floats = np.stack([s.temperature, s.top_p, s.min_p, s.repetition, s.presence, s.frequency],
                      axis=1).astype(np.float32)
    return ints, floats


def unpack_inputs(ints: jax.Array, floats: jax.Array, T: int, W: int) -> StepInputs:
    tokens, positions, table = ints[:, :T], ints[:, T:2 * T], ints[:, 2 * T:2 * T + W]
    c = [ints[:, 2 * T + W + i] for i in range(_N_INT_COLS)]
    f = [floats[:, i] for i in range(_N_FLOAT_COLS)]
    seed = jax.lax.bitcast_convert_type(c[5], jnp.uint32)
    samp = SamplingArrays(temperature=f[0], top_k=c[4], top_p=f[1], min_p=f[2], repetition=f[3], presence=f[4],
                          frequency=f[5], seed=seed, counter=c[6])
    return StepInputs(tokens, positions, table, c[0], c[7], c[1], c[2], c[3] > 0, samp)


def _step(config: ModelConfig, params: Any, state: DeviceState, ints: jax.Array, floats: jax.Array,
          mask: jax.Array, *, T: int, W: int) -> tuple[DeviceState, tuple[jax.Array, jax.Array]]:
    """One bucket's step: forward over the rows' tokens, sample within each row's token mask (int32
    [B, ceil(V/32)] packed bits), count. Returns the new state and
    (int32 [B, 1 + M] = token, top ids; float32 [B, 1 + M] = logprob, top logprobs)."""
    inp = unpack_inputs(ints, floats, T, W)
    cache = PagedCache(state.k, state.v, state.k_scale, state.v_scale, inp.page_table, inp.lengths)
    logits, cache = forward(params, inp.tokens, inp.positions, config=config, cache=cache, rope_len=inp.rope_len,
                            logits_index=inp.last_idx)
    out = sample(logits, state.counts[inp.slots], state.prompt_mask[inp.slots], inp.sampling,
                 unpack_bitmask(mask, logits.shape[-1]))
    counts = state.counts.at[inp.slots, out.tokens].add(inp.do_sample.astype(jnp.int32))
    new_state = DeviceState(cache.k, cache.v, cache.k_scale, cache.v_scale, counts, state.prompt_mask)
    return new_state, (jnp.concatenate([out.tokens[:, None], out.top_ids], axis=1),
                       jnp.concatenate([out.logprobs[:, None], out.top_logprobs], axis=1))


@functools.lru_cache(maxsize=16)
def _jitted_step(config: ModelConfig, state_shardings: DeviceState, replicated: NamedSharding) -> Any:
    """One jitted step per (config, placement): engines built alike share JAX's trace and compile caches."""
    return jax.jit(functools.partial(_step, config), donate_argnums=(1,), static_argnames=("T", "W"),
                   out_shardings=(state_shardings, replicated))


@functools.lru_cache(maxsize=16)
def _jitted_reset(state_shardings: DeviceState) -> Any:
    return jax.jit(_reset_slot, donate_argnums=(0,), out_shardings=state_shardings)


@functools.lru_cache(maxsize=64)
def _zeros_fn(shape: tuple[int, ...], dtype: jnp.dtype, sharding: NamedSharding) -> Any:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _reset_slot(state: DeviceState, slot: jax.Array, tokens: jax.Array, prompt_len: jax.Array,
                total_len: jax.Array) -> DeviceState:
    """Penalty state of a newly admitted sequence: prompt tokens and counts of already generated ones."""
    V = state.counts.shape[1]
    idx = jnp.arange(tokens.shape[0])
    in_prompt = idx < prompt_len
    generated = (idx >= prompt_len) & (idx < total_len)
    mask_row = jnp.zeros((V,), jnp.bool_).at[tokens].max(in_prompt)
    count_row = jnp.zeros((V,), jnp.int32).at[tokens].add(generated.astype(jnp.int32))
    return state._replace(counts=state.counts.at[slot].set(count_row),
                          prompt_mask=state.prompt_mask.at[slot].set(mask_row))


WarmupProgress = Callable[[int, int, "tuple[int, int, int] | None", float], None]
_WARMUP_PROGRESS: contextvars.ContextVar[WarmupProgress | None] = contextvars.ContextVar("warmup_progress",
                                                                                          default=None)


@contextlib.contextmanager
def warmup_progress(callback: WarmupProgress) -> Iterator[None]:
    """Report warm-up progress of the engines built inside this block (Engine(...) warms up in its
    constructor, so the callback cannot be passed through it)."""
    token = _WARMUP_PROGRESS.set(callback)
    try:
        yield
    finally:
        _WARMUP_PROGRESS.reset(token)


def pick_bucket(buckets: tuple[int, ...], n: int, what: str) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ConfigError(f"{what} {n} exceeds the largest bucket {buckets[-1]}; raise the bucket list")
    return buckets[i]


class ModelRunner:
    """Holds params and device state; runs scheduled rows through compiled bucket executables."""

    def __init__(self, config: ModelConfig, params: Any, *, num_pages: int, page_size: int, kv_dtype: str,
                 num_slots: int, max_model_len: int, decode_batch: tuple[int, ...],
                 prefill_batch: tuple[int, ...], chunks: tuple[int, ...], widths: tuple[int, ...],
                 mesh: Mesh | None = None, param_shardings: Any = None):
        install_compile_listener()
        self.config = config
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.decode_batch, self.prefill_batch = decode_batch, prefill_batch
        self.chunks, self.widths = chunks, widths
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1),
                                                       ("data", "fsdp", "sequence", "tensor"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = self._place_params(params, param_shardings)
        self.state = self._init_state(kv_dtype)
        self.state_shardings = jax.tree.map(lambda a: a.sharding, self.state)
        self._executables: dict[tuple[int, int, int], Any] = {}
        self._reset_exe: Any = None
        self.warm = False
        self.compiles = 0
        self.compiles_after_warmup = 0
        self.compile_seconds = 0.0
        self.mask_words = mask_words(config.vocab_size)
        self._all_allowed: dict[int, jax.Array] = {}  # B -> device-resident all-ones mask
        self.mask_seconds = 0.0  # host time spent computing grammar masks
        self.masked_rows = 0

    # ---- placement ---------------------------------------------------------------------------------
    def _place_params(self, params: Any, shardings: Any = None) -> Any:
        """Shard params over the mesh by their logical axes (any pytree is simply copied to a 1-device mesh)."""
        if shardings is None and self.mesh.size == 1:
            return jax.device_put(params, self.replicated)
        if shardings is None:
            try:
                shardings = tree_shardings(self.mesh, param_axes(self.config), params)
            except (ValueError, TypeError) as e:
                raise ConfigError("params do not match the InternLM2 layout of internlm_jax.model.param_axes, so "
                                  "the engine cannot shard them over the mesh; pass param_shardings= (a pytree of "
                                  f"shardings matching params) ({e})") from e
        return jax.device_put(params, shardings)

    def _init_state(self, kv_dtype: str) -> DeviceState:
        c = self.config
        dt = resolve_kv_dtype(c, kv_dtype)
        shape = (c.num_layers, self.num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        pool_s = named_sharding(self.mesh, (None, None, None, "kv_heads", None), shape)
        scale_s = named_sharding(self.mesh, (None, None, None, "kv_heads"), shape[:-1])
        zeros = lambda shp, d, s: _zeros_fn(shp, jnp.dtype(d), s)()  # noqa: E731
        quant = dt == jnp.int8
        rows = self.num_slots + 1
        return DeviceState(
            k=zeros(shape, dt, pool_s), v=zeros(shape, dt, pool_s),
            k_scale=zeros(shape[:-1], jnp.float32, scale_s) if quant else None,
            v_scale=zeros(shape[:-1], jnp.float32, scale_s) if quant else None,
            counts=zeros((rows, c.vocab_size), jnp.int32, self.replicated),
            prompt_mask=zeros((rows, c.vocab_size), jnp.bool_, self.replicated))

    # ---- compilation -------------------------------------------------------------------------------
    def bucket_keys(self) -> list[tuple[int, int, int]]:
        keys = [(b, 1, w) for b in self.decode_batch for w in self.widths]
        keys += [(b, t, w) for b in self.prefill_batch for t in self.chunks if t > 1 for w in self.widths]
        return sorted(set(keys))

    def _abstract_inputs(self, B: int, T: int, W: int) -> tuple[jax.ShapeDtypeStruct, ...]:
        return (jax.ShapeDtypeStruct((B, 2 * T + W + _N_INT_COLS), np.int32, sharding=self.replicated),
                jax.ShapeDtypeStruct((B, _N_FLOAT_COLS), np.float32, sharding=self.replicated),
                jax.ShapeDtypeStruct((B, self.mask_words), np.int32, sharding=self.replicated))

    def _abstract(self, tree: Any) -> Any:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)

    def _compile(self, key: tuple[int, int, int]) -> Any:
        t0 = time.perf_counter()
        fn = _jitted_step(self.config, self.state_shardings, self.replicated)
        with use_mesh(self.mesh):
            exe = fn.lower(self._abstract(self.params), self._abstract(self.state), *self._abstract_inputs(*key),
                           T=key[1], W=key[2]).compile()
        self.compile_seconds += time.perf_counter() - t0
        self.compiles += 1
        if self.warm:
            self.compiles_after_warmup += 1
        self._executables[key] = exe
        return exe

    def _reset_executable(self) -> Any:
        if self._reset_exe is None:
            fn = _jitted_reset(self.state_shardings)
            s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=self.replicated)  # noqa: E731
            self._reset_exe = fn.lower(self._abstract(self.state), s((), np.int32),
                                       s((self.max_model_len,), np.int32), s((), np.int32),
                                       s((), np.int32)).compile()
            self.compiles += 1
            if self.warm:
                self.compiles_after_warmup += 1
        return self._reset_exe

    def warmup(self, progress: WarmupProgress | None = None) -> None:
        """Compile every bucket (without running them); later compiles count as misses. `progress` (or the
        one installed by `warmup_progress`) is called before each program as progress(i, n, key, elapsed_s),
        key = (B, T, W) or None for the slot-reset program, and once more with i == n when done."""
        progress = progress or _WARMUP_PROGRESS.get()
        keys = [k for k in self.bucket_keys() if k not in self._executables]
        n = len(keys) + (self._reset_exe is None)
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            if progress is not None:
                progress(i, n, key, time.perf_counter() - t0)
            self._compile(key)
        if self._reset_exe is None and progress is not None:
            progress(n - 1, n, None, time.perf_counter() - t0)
        self._reset_executable()
        for B in sorted(set(self.decode_batch) | set(self.prefill_batch)):
            self.all_allowed(B)
        if progress is not None:
            progress(n, n, None, time.perf_counter() - t0)
        self.warm = True

    # ---- execution ---------------------------------------------------------------------------------
    def reset_slot(self, slot: int, tokens: list[int], prompt_len: int) -> None:
        buf = np.zeros((self.max_model_len,), np.int32)
        buf[: len(tokens)] = tokens
        args = jax.device_put((np.int32(slot), buf, np.int32(prompt_len), np.int32(len(tokens))),
                              self.replicated)
        self.state = self._reset_executable()(self.state, *args)

    def _inputs(self, rows: list[Row], B: int, T: int, W: int) -> StepInputs:
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        table = np.zeros((B, W), np.int32)
        lengths = np.zeros((B,), np.int32)
        rope_len = np.zeros((B,), np.int32)
        last = np.zeros((B,), np.int32)
        slots = np.full((B,), self.num_slots, np.int32)
        do_sample = np.zeros((B,), np.bool_)
        samp_rows = []
        for i, r in enumerate(rows):
            s = r.seq
            tokens[i, : r.n] = s.tokens[r.start: r.start + r.n]
            positions[i, : r.n] = np.arange(r.start, r.start + r.n)
            table[i, : len(s.pages)] = s.pages
            lengths[i] = r.start
            # Every token of the prompt is rotated for the prompt's whole length, whatever the chunking (a
            # recomputed output token at position p gets max(prompt, p + 1) = p + 1, as when it was decoded).
            rope_len[i] = s.prompt_len
            last[i] = r.n - 1
            slots[i] = s.slot
            do_sample[i] = r.sample
            samp_rows.append((s.sampling, s.seed, s.num_generated))
        samp = SamplingArrays.build(samp_rows, B)
        return StepInputs(tokens, positions, table, lengths, rope_len, last, slots, do_sample, samp)

    def _mask(self, rows: list[Row], B: int) -> np.ndarray | None:
        """Packed allowed-token masks of the rows that sample under a grammar; None if there are none."""
        constrained = [(i, r.seq.grammar) for i, r in enumerate(rows)
                       if r.sample and getattr(r.seq, "grammar", None) is not None]
        if not constrained:
            return None
        t0 = time.perf_counter()
        mask = np.full((B, self.mask_words), -1, np.int32)
        fill_bitmasks(constrained, mask)
        self.mask_seconds += time.perf_counter() - t0
        self.masked_rows += len(constrained)
        return mask

    def all_allowed(self, B: int) -> jax.Array:
        if B not in self._all_allowed:
            self._all_allowed[B] = jax.device_put(np.full((B, self.mask_words), -1, np.int32), self.replicated)
        return self._all_allowed[B]

    def run(self, rows: list[Row]) -> list[tuple[int, float, np.ndarray, np.ndarray] | None]:
        """Run one scheduler step; per row (token, logprob, top ids, top logprobs) if it sampled, else None."""
        results: list[Any] = [None] * len(rows)
        # One call for the decodes (T = 1) and one per chunk bucket used by prefills, so a short chunk is
        # not padded to a long one's length.
        by_t: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_t.setdefault(1 if r.n == 1 else pick_bucket(self.chunks, r.n, "prefill chunk"), []).append(i)
        pending = []
        for T, idx in sorted(by_t.items()):
            group = [rows[i] for i in idx]
            B = pick_bucket(self.decode_batch if T == 1 else self.prefill_batch, len(group), "rows in a step")
            W = pick_bucket(self.widths, max(len(r.seq.pages) for r in group), "page-table width")
            exe = self._executables.get((B, T, W)) or self._compile((B, T, W))
            host = pack_inputs(self._inputs(group, B, T, W))
            mask = self._mask(group, B)
            if mask is None:
                (ints, floats), mask = jax.device_put(host, self.replicated), self.all_allowed(B)
            else:
                ints, floats, mask = jax.device_put((*host, mask), self.replicated)
            self.state, out = exe(self.params, self.state, ints, floats, mask)
            pending.append((idx, out))
        for idx, out in pending:  # fetch after dispatching every call
            ints, floats = jax.device_get(out)
            for j, i in enumerate(idx):
                if rows[i].sample:
                    results[i] = (int(ints[j, 0]), float(floats[j, 0]), ints[j, 1:], floats[j, 1:])
        return results


def auto_buckets(limit: int, count: int, minimum: int = 1, factor: int = 4) -> tuple[int, ...]:
    """`count` sizes ending at `limit`, each `factor` times smaller than the next (at least `minimum`)."""
    out = {limit}
    b = limit
    for _ in range(count - 1):
        b = max(minimum, -(-b // factor))
        out.add(b)
    return tuple(sorted(out))


__all__ = ["DeviceState", "ModelRunner", "StepInputs", "auto_buckets", "pick_bucket", "BACKEND_COMPILES",
           "MAX_TOP_LOGPROBS", "warmup_progress"]
