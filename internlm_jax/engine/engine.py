"""The Engine: continuous batching over a paged KV cache, with an async streaming API.

    engine = Engine(params, config, EngineConfig(...), tokenizer=tok)     # compiles all buckets (warm-up)
    outs = engine.generate([ids1, ids2], SamplingParams(temperature=0, max_tokens=32))   # sync, batched
    async for ev in engine.submit(ids, SamplingParams(...)):                # streams TokenEvents
        ...
    engine.abort(request_id); engine.stats(); engine.shutdown()

Threading: `submit` starts a background thread that steps the device while there is work; events reach
asyncio consumers through `loop.call_soon_threadsafe`. `add_request`, `abort` and `stats` are thread-safe
(one lock; a step holds it while it runs, so an abort frees its pages right after the step in flight).
Without the thread (tests, batch jobs) `step()` and `generate()` run on the caller's thread.

Constrained decoding: a request whose SamplingParams has a `grammar` (internlm_jax.grammar.GrammarSpec) gets
one grammar matcher per sample; the runner turns each matcher into the row's token mask before a step, and
`_on_token` advances it with the sampled token. A sample whose grammar is complete finishes with "stop".
The grammar compiler is built from the engine's tokenizer on first use (compiled grammars cached per spec).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.engine.detok import IncrementalText, resolve_decode_fn
from internlm_jax.engine.pages import ROOT_HASH, PageAllocator
from internlm_jax.engine.runner import BACKEND_COMPILES, ModelRunner, auto_buckets
from internlm_jax.engine.scheduler import FINISHED, Scheduler, SchedulerConfig
from internlm_jax.engine.scheduler import Sequence as Seq
from internlm_jax.kv_cache import page_bytes
from internlm_jax.sampling import SamplingParams

log = logging.getLogger("internlm_jax.engine")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving knobs. Bucket tuples left None are derived (a few sizes each, see runner.auto_buckets)."""

    page_size: int = 64
    num_pages: int | None = None  # explicit pool size, else from kv_cache_tokens, else device memory
    kv_cache_tokens: int | None = None
    kv_memory_fraction: float = 0.5  # of free device memory after the weights (TPU/GPU)
    kv_dtype: str = "auto"  # auto (= model dtype) | float32 | bfloat16 | float16 | int8
    max_num_seqs: int = 64  # slots: sequences decoding together
    max_model_len: int | None = None  # prompt + output; default the model's max_position_embeddings
    max_num_batched_tokens: int = 512  # token budget of one step (decodes + prefill chunks)
    chunked_prefill: bool = True
    chunk_size: int | None = None  # longest prefill chunk; default max_num_batched_tokens
    max_prefill_rows: int = 4  # prefill chunks per step
    enable_prefix_caching: bool = True
    decode_batch_buckets: tuple[int, ...] | None = None
    prefill_batch_buckets: tuple[int, ...] | None = None
    chunk_buckets: tuple[int, ...] | None = None
    width_buckets: tuple[int, ...] | None = None  # page-table widths, in pages
    eos_token_ids: tuple[int, ...] | None = None  # default (config.eos_token_id,)
    warmup: bool = True  # False: buckets compile on first use, and each such compile is counted
    compilation_cache_dir: str | None = None  # JAX's persistent cache (process-wide): warm-up loads, not compiles
    seed: int = 0  # draws seeds for requests that give none

    def __post_init__(self) -> None:
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "max_prefill_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens <= self.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must exceed max_num_seqs "
                              f"({self.max_num_seqs}) so prefill progresses while every slot decodes")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


def prefix_root(config: ModelConfig, prompt_len: int) -> bytes:
    """Root of a sequence's prefix-hash chain. Under dynamic NTK a prompt longer than max_position_embeddings
    rotates every key with the base of its own length (layers.rope_tables), so its pages can only be shared
    with prompts of the same length; every other page holds keys rotated as any sequence would rotate them
    at those positions, and shares the plain root."""
    scaling = config.rope_scaling
    if scaling is not None and scaling[0] == "dynamic" and prompt_len > config.max_position_embeddings:
        return ROOT_HASH + prompt_len.to_bytes(8, "little")
    return ROOT_HASH


@dataclasses.dataclass
class TokenEvent:
    """One generated token of one sample (or a final event with token_id None after an abort)."""

    request_id: str
    index: int  # sample index (0..n-1)
    token_id: int | None
    text: str  # newly streamable text ("" while held back for stop strings / incomplete UTF-8)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the sample's last event
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    outputs: list[CompletionOutput]
    cached_tokens: int = 0


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    sink: Callable[[TokenEvent], None] | None
    seqs: list[Seq] = dataclasses.field(default_factory=list)
    detoks: list[IncrementalText | None] = dataclasses.field(default_factory=list)
    arrival: float = 0.0
    first_token: float | None = None
    done: int = 0


class RequestStream:
    """Async iterator of one request's TokenEvents; ends after every sample's final event."""

    def __init__(self, engine: "Engine", request_id: str, queue: asyncio.Queue, n: int):
        self.engine, self.request_id, self._queue, self._left = engine, request_id, queue, n

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._left == 0:
            raise StopAsyncIteration
        ev = await self._queue.get()
        if ev.finished:
            self._left -= 1
        return ev

    async def aclose(self) -> None:
        """Stop early: the request is aborted and its pages freed."""
        if self._left:
            self.engine.abort(self.request_id)
            self._left = 0


class Engine:
    def __init__(self, params: Any, config: ModelConfig, engine_config: EngineConfig | None = None, *,
                 tokenizer: Any = None, decode_fn: Callable[[list[int]], str] | None = None,
                 mesh: Mesh | None = None, param_shardings: Any = None):
        """params: the model's param tree (plain or quantized weights). tokenizer (anything with
        .decode(ids)) or decode_fn gives text, needed for stop strings. mesh: shard params by their logical
        axes and the page pool over kv heads (the `tensor` axis); param_shardings overrides the params'
        placement (e.g. for weight types param_axes does not describe)."""
        ec = engine_config or EngineConfig()
        self.config, self.engine_config = config, ec
        if ec.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", ec.compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.decode_fn = decode_fn or resolve_decode_fn(tokenizer)
        self.tokenizer = tokenizer
        self._grammar_compiler: Any = None
        self.max_model_len = ec.max_model_len or config.max_position_embeddings
        ps = ec.page_size
        self.max_pages_per_seq = -(-self.max_model_len // ps)
        self.num_pages = self._pool_pages(params, ec)
        if self.num_pages < self.max_pages_per_seq:
            raise ConfigError(f"the KV pool has {self.num_pages} pages of {ps} tokens, fewer than one sequence of "
                              f"max_model_len={self.max_model_len} needs ({self.max_pages_per_seq}); lower "
                              "max_model_len or give the pool more memory/tokens")
        chunk = ec.chunk_size or ec.max_num_batched_tokens
        if not ec.chunked_prefill:
            chunk = self.max_model_len
        self.buckets = dict(
            decode_batch=ec.decode_batch_buckets or auto_buckets(ec.max_num_seqs, 4),
            prefill_batch=ec.prefill_batch_buckets or auto_buckets(ec.max_prefill_rows, 3, factor=2),
            chunks=ec.chunk_buckets or auto_buckets(chunk, 3, minimum=8),
            widths=ec.width_buckets or auto_buckets(self.max_pages_per_seq, 3))
        self._check_buckets(chunk)
        self.eos = set(ec.eos_token_ids if ec.eos_token_ids is not None else (config.eos_token_id,))
        self.allocator = PageAllocator(self.num_pages, ps)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=ec.max_num_seqs, max_num_batched_tokens=ec.max_num_batched_tokens, chunk_size=chunk,
            chunked_prefill=ec.chunked_prefill, max_prefill_rows=ec.max_prefill_rows, page_size=ps,
            enable_prefix_caching=ec.enable_prefix_caching), self.allocator)
        self.params_source = params  # the tree the runner's (placed) params came from
        self.runner = ModelRunner(
            config, params, num_pages=self.num_pages, page_size=ps, kv_dtype=ec.kv_dtype,
            num_slots=ec.max_num_seqs, max_model_len=self.max_model_len, mesh=mesh,
            param_shardings=param_shardings, **self.buckets)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._rng = np.random.default_rng(ec.seed)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._error: BaseException | None = None
        self.steps = 0
        self.generated_tokens = 0
        self.backend_compiles_after_warmup = 0
        self.warmup_seconds = 0.0
        if ec.warmup:
            self.warmup()
        else:
            self.runner.warm = True  # nothing was compiled ahead: every compile happens on the request path

    # ---- set-up ------------------------------------------------------------------------------------
    def _pool_pages(self, params: Any, ec: EngineConfig) -> int:
        ps = ec.page_size
        if ec.num_pages is not None:
            return ec.num_pages
        if ec.kv_cache_tokens is not None:
            return -(-ec.kv_cache_tokens // ps)
        per_page = page_bytes(self.config, ps, ec.kv_dtype)
        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if stats and "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            if not any(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
                free -= sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
            return max(1, int(free * ec.kv_memory_fraction) // per_page)
        # CPU: no memory statistics; enough for every slot at full length, capped at 1 GiB of cache.
        want = ec.max_num_seqs * -(-self.max_model_len // ps)
        return max(-(-self.max_model_len // ps), min(want, (1 << 30) // per_page))

    def _check_buckets(self, chunk: int) -> None:
        b = self.buckets
        for name in b:
            b[name] = tuple(sorted(set(int(x) for x in b[name])))
            if not b[name] or b[name][0] < 1:
                raise ConfigError(f"{name} buckets must be positive sizes, got {b[name]}")
        ec = self.engine_config
        need = dict(decode_batch=ec.max_num_seqs, prefill_batch=ec.max_prefill_rows, chunks=chunk,
                    widths=self.max_pages_per_seq)
        for name, n in need.items():
            if b[name][-1] < n:
                raise ConfigError(f"the largest {name} bucket {b[name][-1]} is below {n}, which the engine can "
                                  f"need (from max_num_seqs/max_prefill_rows/chunk size/max_model_len)")

    def warmup(self) -> None:
        """Compile every bucket executable now (skipped work is compiled on first use and counted)."""
        t0 = time.perf_counter()
        self.runner.warmup()
        self.warmup_seconds += time.perf_counter() - t0

    def update_params(self, params: Any) -> None:
        """Serve new weights of the same structure (after a training update, or `lm.params = ...`): they are
        placed like the old ones and the compiled steps are reused; cached prefix pages are dropped."""
        old, new = jax.tree.structure(self.runner.params), jax.tree.structure(params)
        if old != new:
            raise ConfigError(f"update_params needs params of the same structure as the engine's ({old} vs {new})")
        with self._lock:
            placed = self.runner.params
            self.runner.params = jax.tree.map(lambda p, o: jax.device_put(p, o.sharding), params, placed)
            self.params_source = params
            self.allocator.clear_cache()

    @property
    def grammar_compiler(self) -> Any:
        """The grammar.GrammarCompiler for this engine's tokenizer and vocabulary (built on first use)."""
        if self._grammar_compiler is None:
            from internlm_jax.grammar import GrammarCompiler

            if self.tokenizer is None:
                raise ConfigError("constrained decoding (SamplingParams.grammar) needs the tokenizer: create the "
                                  "Engine with tokenizer=")
            stops = sorted(self.eos | ({self.tokenizer.im_end_id} if "<|im_end|>" in
                                       getattr(self.tokenizer, "special_tokens", {}) else set()))
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.config.vocab_size, stops)
        return self._grammar_compiler

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, on_event: Callable[[TokenEvent], None] | None = None) -> str:
        """Queue a request (thread-safe); `on_event` is called on the stepping thread for every event and
        must return quickly (hand the event to a queue)."""
        sampling = sampling or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ConfigError("the prompt is empty; pass at least one token id (e.g. the BOS token)")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if len(prompt) + 1 > self.max_model_len:
            raise ConfigError(f"the prompt has {len(prompt)} tokens; max_model_len={self.max_model_len} leaves no "
                              "room for output. Shorten the prompt or raise max_model_len")
        if sampling.stop and self.decode_fn is None:
            raise ConfigError("stop strings need text: create the Engine with tokenizer= or decode_fn=")
        matchers = [None] * sampling.n
        if sampling.grammar is not None:  # compiled (or found in the cache) before the request is queued
            matchers = [self.grammar_compiler.matcher(sampling.grammar) for _ in range(sampling.n)]
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._requests:
                raise ConfigError(f"request id {rid!r} is already in flight; ids must be unique")
            req = Request(rid, prompt, sampling, on_event, arrival=time.perf_counter())
            base_seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(0, 2**31))
            root = prefix_root(self.config, len(prompt))
            for i in range(sampling.n):
                seq = Seq(next(self._seq_ids), req, i, list(prompt), len(prompt), sampling, seed=base_seed + i,
                          parent=req.seqs[0] if i else None, hash_root=root, grammar=matchers[i])
                req.seqs.append(seq)
                req.detoks.append(None if self.decode_fn is None else IncrementalText(
                    self.decode_fn, prompt, sampling.stop, sampling.include_stop_str_in_output))
                self.scheduler.add(seq)
            self._requests[rid] = req
            self._wake.notify_all()
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now: its pages are freed and each unfinished sample gets a final 'abort' event."""
        events = []
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return False
            for seq in req.seqs:
                if seq.status != FINISHED:
                    self.scheduler.finish(seq, "abort")
                    events.append(self._final_event(req, seq, "abort"))
            self._deliver(events)
        return True

    def _final_event(self, req: Request, seq: Seq, reason: str) -> tuple[Request, TokenEvent]:
        det = req.detoks[seq.index]
        req.done += 1
        if req.done == len(req.seqs):
            self._requests.pop(req.request_id, None)
        return req, TokenEvent(req.request_id, seq.index, None, det.take(True) if det else "", finish_reason=reason,
                               prompt_tokens=seq.prompt_len, cached_tokens=seq.cached_tokens)

    @staticmethod
    def _deliver(events: list[tuple[Request, TokenEvent]]) -> None:
        """Call the sinks (on the stepping thread, under the engine lock: sinks must not block)."""
        for req, ev in events:
            if req.sink is not None:
                req.sink(ev)

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> int:
        """Schedule and run one step; returns the number of rows run (0 = nothing to do)."""
        events: list[tuple[Request, TokenEvent]] = []
        tid = threading.get_ident()
        with self._lock:
            before = BACKEND_COMPILES[tid]
            rows = self.scheduler.schedule()
            if not rows:
                return 0
            for s in self.scheduler.admitted:  # penalty state of the slot: this sequence's tokens
                if s.sampling.uses_penalties:
                    self.runner.reset_slot(s.slot, s.tokens, s.prompt_len)
            results = self.runner.run(rows)
            self.scheduler.after_step(rows)
            for r, res in zip(rows, results):
                if res is not None and r.seq.status != FINISHED:
                    ev = self._on_token(r.seq, *res)
                    if ev is not None:
                        events.append(ev)
            self.steps += 1
            if self.runner.warm:
                self.backend_compiles_after_warmup += BACKEND_COMPILES[tid] - before
            self._deliver(events)  # under the lock: a concurrent abort's final event cannot overtake them
        return len(rows)

    def _on_token(self, seq: Seq, token: int, logprob: float, top_ids: np.ndarray, top_lps: np.ndarray):
        req: Request = seq.request
        sp = seq.sampling
        seq.tokens.append(token)
        self.generated_tokens += 1
        if req.first_token is None:
            req.first_token = time.perf_counter()
        det = req.detoks[seq.index]
        reason = None
        stop_token = token in sp.stop_token_ids or (token in self.eos and not sp.ignore_eos)
        g = seq.grammar
        if g is not None and not g.accept(token) and not stop_token:
            # Cannot happen when the token was sampled within the row's mask; a forced token (tests) can.
            log.error("request %s: token %d is outside its grammar (%s); aborting the sample", req.request_id,
                      token, g.error)
            reason = "abort"
        elif stop_token or (det is not None and det.push(token)):  # a stop token or a stop string
            reason = "stop"
        elif g is not None and g.done:  # the grammar is complete: nothing but a stop token could follow
            reason = "stop"
        elif seq.num_generated >= sp.max_tokens or len(seq.tokens) >= self.max_model_len:
            reason = "length"
        top = None
        if sp.logprobs:
            top = [(int(i), float(v)) for i, v in zip(top_ids[: sp.logprobs], top_lps[: sp.logprobs])]
        ev = TokenEvent(req.request_id, seq.index, token, det.take(reason is not None) if det else "",
                        logprob if sp.logprobs is not None else None, top, None, seq.prompt_len, seq.cached_tokens)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            ev.finish_reason = reason
            req.done += 1
            if req.done == len(req.seqs):
                self._requests.pop(req.request_id, None)
        return req, ev

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    # ---- sync convenience ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams] | None
                 = None) -> list[RequestOutput]:
        """Run prompts to completion (batched by the scheduler) and return their outputs in order."""
        if isinstance(sampling, SamplingParams) or sampling is None:
            sampling = [sampling or SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise ConfigError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
        collected: dict[str, list[TokenEvent]] = {}
        done = threading.Event()
        left = [sum(sp.n for sp in sampling)]
        lock = threading.Lock()

        def sink(ev: TokenEvent) -> None:
            collected[ev.request_id].append(ev)
            if ev.finished:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        ids = []
        for p, sp in zip(prompts, sampling):
            rid = f"gen-{next(self._ids)}"
            collected[rid] = []
            ids.append(self.add_request(p, sp, rid, on_event=sink))
        if self._thread is not None and self._thread.is_alive():
            while not done.wait(0.1):
                self._raise_if_failed()
        else:
            while not done.is_set():
                if self.step() == 0 and not done.is_set():
                    raise RuntimeError("the engine has nothing to run but requests are unfinished (a bug)")
        return [self._collect(rid, list(p), sp, collected[rid]) for rid, p, sp in zip(ids, prompts, sampling)]

    @staticmethod
    def _collect(rid: str, prompt: list[int], sp: SamplingParams, events: list[TokenEvent]) -> RequestOutput:
        outs = []
        for i in range(sp.n):
            evs = [e for e in events if e.index == i]
            toks = [e for e in evs if e.token_id is not None]
            outs.append(CompletionOutput(
                i, [e.token_id for e in toks], "".join(e.text for e in evs), evs[-1].finish_reason if evs else None,
                [e.logprob for e in toks] if sp.logprobs is not None else None,
                [e.top_logprobs or [] for e in toks] if sp.logprobs else None))
        cached = events[0].cached_tokens if events else 0
        return RequestOutput(rid, prompt, outs, cached)

    # ---- async API and the background loop ---------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
               request_id: str | None = None) -> RequestStream:
        """From a coroutine: queue a request and get an async iterator of its TokenEvents."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        sampling = sampling or SamplingParams()
        rid = self.add_request(prompt_ids, sampling, request_id,
                               on_event=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        self.start()
        return RequestStream(self, rid, queue, sampling.n)

    def start(self) -> None:
        """Start the background stepping thread (idempotent)."""
        with self._lock:
            self._raise_if_failed()
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="internlm-jax-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stop and not self.scheduler.has_work():
                        self._wake.wait()
                    if self._stop:
                        return
                self.step()
        except BaseException as e:  # surface device errors to callers instead of hanging them
            self._error = e
            with self._lock:
                for req in list(self._requests.values()):
                    for seq in req.seqs:
                        if seq.status != FINISHED:
                            self.scheduler.finish(seq, "abort")
                            self._deliver([self._final_event(req, seq, "abort")])

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine loop failed: {self._error!r}") from self._error

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the background thread (if any); the engine can still be stepped or started again."""
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---- stats -------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            a, s, r = self.allocator, self.scheduler, self.runner
            return dict(
                running=len(s.running), waiting=len(s.waiting), pages_total=a.num_pages, pages_used=a.num_used,
                pages_free=a.num_free, pages_cached=a.num_cached, page_size=a.page_size,
                prefix_hit_rate=a.hit_rate(), prefix_hit_tokens=a.hit_tokens, prefix_query_tokens=a.query_tokens,
                compilations=r.compiles_after_warmup + self.backend_compiles_after_warmup,
                bucket_compiles_after_warmup=r.compiles_after_warmup,
                backend_compiles_after_warmup=self.backend_compiles_after_warmup,
                warmup_compilations=r.compiles - r.compiles_after_warmup, warmup_seconds=self.warmup_seconds,
                preemptions=s.num_preemptions, steps=self.steps, prefill_tokens=s.prefill_tokens,
                decode_tokens=s.decode_tokens, generated_tokens=self.generated_tokens,
                evictions=a.evictions)


__all__ = ["Engine", "EngineConfig", "TokenEvent", "RequestOutput", "CompletionOutput", "RequestStream",
           "SamplingParams"]
