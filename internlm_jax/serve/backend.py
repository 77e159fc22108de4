"""The server's side of the engine: admission (bounded queue), event delivery to asyncio, abort, metrics.

One HTTP call may hold several engine requests (a completions call with several prompts); they share one
`Generation`, whose `batches()` yields every event that arrived since the last batch. Events are handed
from the engine's stepping thread through a deque; the event loop is woken once per batch, not per token,
so 64 streams cost a few wake-ups per engine step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from internlm_jax.config import ConfigError
from internlm_jax.engine import SamplingParams, TokenEvent
from internlm_jax.serve.errors import APIError
from internlm_jax.serve.metrics import ServerMetrics

log = logging.getLogger("internlm_jax.serve")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """HTTP-level settings (the engine has its own EngineConfig)."""

    model_name: str = "internlm2"
    api_keys: tuple[str, ...] = ()
    max_queue: int = 256  # sequences allowed to wait beyond the engine's decode slots; more -> 429
    max_body_bytes: int = 8 << 20
    cors_origins: tuple[str, ...] = ()
    scoring_batch: int = 4  # rows per prompt-logprob forward
    random_weights: bool = False  # shown in /v1/models and /health: the model is an untrained preset
    # Special-token names inside message content (and tools) become control tokens: only for trusted clients,
    # since a user could then forge turns ("<|im_end|>\n<|im_start|>system ..."). Off: they are plain text.
    allow_special_tokens_in_content: bool = False
    open_metrics: bool = False  # /metrics answers without an API key even when keys are set (for a scraper)


class _Channel:
    """Thread -> asyncio hand-off: put() from any thread, get_all() in the loop returns everything queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: collections.deque[tuple[int, TokenEvent, float]] = collections.deque()
        self._lock = threading.Lock()
        self._signalled = False
        self._ready = asyncio.Event()

    def put(self, item: tuple[int, TokenEvent, float]) -> None:
        with self._lock:
            self._items.append(item)
            if self._signalled:
                return
            self._signalled = True
        self._loop.call_soon_threadsafe(self._ready.set)

    async def get_all(self) -> list[tuple[int, TokenEvent, float]]:
        await self._ready.wait()
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._signalled = False
            self._ready.clear()
        return items


class _Admitter:
    """One thread that hands new requests to the engine, all pending ones under one lock acquisition.

    `Engine.add_request` takes the engine lock, which a step holds while the device runs; many threads each
    waiting for it (one per request) would be starved by the stepping thread re-taking it. Here one thread
    waits, once per batch of arrivals, and resolves each caller's future on its event loop.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self._cv = threading.Condition()
        self._pending: list[tuple[Generation, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._thread: threading.Thread | None = None

    def submit(self, gen: Generation) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            self._pending.append((gen, fut, loop))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="internlm-jax-admit", daemon=True)
                self._thread.start()
            self._cv.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                batch, self._pending = self._pending, []
            lock = getattr(self.engine, "_lock", None) or contextlib.nullcontext()
            results: list[BaseException | None] = []
            with lock:  # re-entrant: every add_request below re-takes it for free
                try:
                    self.engine.start()  # idempotent; it raises if the stepping thread died
                except RuntimeError as e:
                    failed: BaseException | None = e
                else:
                    failed = None
                for gen, _, _ in batch:
                    if failed is not None:
                        results.append(failed)
                        continue
                    try:
                        for i, p in enumerate(gen.prompts):
                            if gen._closed:  # the caller went away while this waited
                                break
                            rid = gen.backend.new_id("req")
                            gen.request_ids.append(rid)
                            self.engine.add_request(p, gen.sampling, rid, on_event=gen._sink(i))
                        if gen._closed:  # closed during the adds: nobody else will abort these
                            for rid in gen.request_ids:
                                self.engine.abort(rid)
                        results.append(None)
                    except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                        results.append(e)
            for (_, fut, loop), err in zip(batch, results):
                loop.call_soon_threadsafe(_resolve, fut, err)


def _resolve(fut: asyncio.Future, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


class Generation:
    """The engine requests of one HTTP call. Iterate `batches()`; `close()` aborts whatever is unfinished."""

    def __init__(self, backend: Backend, prompts: list[list[int]], sampling: SamplingParams, arrival: float):
        self.backend, self.prompts, self.sampling, self.arrival = backend, prompts, sampling, arrival
        self.request_ids: list[str] = []
        self.left = len(prompts) * sampling.n  # samples not finished yet
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._channel = _Channel(asyncio.get_running_loop())
        self._first: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def _sink(self, prompt_index: int):
        put = self._channel.put
        return lambda ev: put((prompt_index, ev, time.perf_counter()))

    async def batches(self) -> AsyncIterator[list[tuple[int, TokenEvent]]]:
        m = self.backend.metrics
        while self.left > 0:
            items = await self._channel.get_all()
            out = []
            for pi, ev, t in items:
                key = (pi, ev.index)
                if ev.token_id is not None:
                    self.completion_tokens += 1
                    if key not in self._first:
                        self._first[key] = t
                        m.ttft.observe(t - self.arrival)
                        self.cached_tokens += ev.cached_tokens
                    else:
                        m.itl.observe(t - self._last[key])
                    self._last[key] = t
                if ev.finished:
                    self.left -= 1
                    m.e2e.observe(t - self.arrival)
                out.append((pi, ev))
            yield out
        self._finish()

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            b = self.backend
            b._open.discard(self)
            b.active -= len(self.prompts) * self.sampling.n
            b.metrics.prompt_tokens.inc(self.prompt_tokens)
            b.metrics.generation_tokens.inc(self.completion_tokens)

    def close(self, disconnect: bool = False) -> None:
        """Abort unfinished engine requests (client gone or error); safe to call twice and from `finally`."""
        if self._closed:
            return
        if self.left > 0:
            if disconnect:
                self.backend.metrics.aborted.inc()
            ids = list(self.request_ids)
            engine = self.backend.engine
            # abort takes the engine lock (held during a device step): do it off the event loop.
            asyncio.get_running_loop().run_in_executor(None, lambda: [engine.abort(r) for r in ids])
        self._finish()


class Backend:
    """Engine + tokenizer + prompt scorer + metrics, shared by every endpoint of one app."""

    def __init__(self, engine: Any, tokenizer: Any, config: ServeConfig, *, scorer: Any = None):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.max_model_len: int = int(engine.max_model_len)
        self.vocab_size: int = int(engine.config.vocab_size)
        ec = getattr(engine, "engine_config", None)
        self.max_running: int = int(getattr(ec, "max_num_seqs", 64))
        self.limit = self.max_running + config.max_queue
        self.active = 0
        self._scorer = scorer
        self._ids = itertools.count()
        self._id_base = uuid.uuid4().hex[:12]
        self._admitter = _Admitter(engine)
        self.metrics = ServerMetrics(self.stats)
        self.started = time.time()
        self.draining = False  # SIGTERM: no new requests; open streams get until the drain deadline
        self.drain_expired = False
        self._open: set[Generation] = set()

    # ---- engine pieces ------------------------------------------------------------------------------
    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            from internlm_jax.serve.scoring import PromptScorer

            runner = self.engine.runner
            self._scorer = PromptScorer(runner.params, self.engine.config, max_len=self.max_model_len,
                                        mesh=runner.mesh, batch=self.config.scoring_batch)
        return self._scorer

    def stats(self) -> dict[str, Any]:
        st = dict(self.engine.stats())
        st["server_active"] = self.active
        st["scoring_compiles"] = self._scorer.compiles if self._scorer is not None else 0
        if self._scorer is not None and self._scorer.warm:  # a prompt-logprob shape compiled on the request path
            st["compilations"] += self._scorer.compiles_after_warmup
        return st

    def healthy(self) -> tuple[bool, str]:
        err = getattr(self.engine, "_error", None)
        if err is not None:
            return False, f"the engine loop failed: {err!r}"
        return True, "ok"

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self._id_base}{next(self._ids):x}"  # unique per server start, no syscall

    # ---- admission ----------------------------------------------------------------------------------
    def check_fits(self, num_prompts: int, n: int) -> None:
        """400 if `num_prompts` prompts x `n` samples can never be admitted, however idle the server is
        (a full queue now is a 429 from open(); this one would be refused forever)."""
        want = num_prompts * n
        if want > self.limit:
            what = f"n={n}" if num_prompts == 1 else f"{num_prompts} prompts x n={n}"
            raise APIError(400, f"this request needs {want} sequences ({what}) but the server never holds more than "
                                f"{self.limit} at once ({self.max_running} decode slots + --max-queue "
                                f"{self.config.max_queue}); lower n or send fewer prompts per request",
                           param="n", code="request_exceeds_server_limit")

    def begin_drain(self, timeout: float) -> None:
        """Graceful shutdown (SIGTERM), on the event loop: refuse new requests with 503 now; after `timeout`
        seconds abort what is still generating, so each open stream ends with an error event."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(timeout, self._expire_drain)

    def abort_error(self) -> APIError:
        """The error a sample that the engine aborted reports (a stream's last event)."""
        if self.drain_expired:
            return APIError(503, "the server shut down before this reply finished (it was draining after SIGTERM); "
                                 "retry the request", code="shutting_down")
        return APIError(503, "generation was aborted by the engine (see the server log)", code="aborted")

    def _expire_drain(self) -> None:
        self.drain_expired = True
        for gen in list(self._open):
            gen.close()  # abort: the samples' final events end their streams (with the shutdown error)

    async def open(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> Generation:
        """Queue every prompt (n samples each) or raise APIError (429 when full, 400 for a bad prompt)."""
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests; retry on another "
                                "replica or after it restarts", code="shutting_down")
        ok, why = self.healthy()
        if not ok:
            raise APIError(503, why + "; restart the server", code="engine_failed")
        self.check_fits(len(prompts), sampling.n)
        want = len(prompts) * sampling.n
        if self.active + want > self.limit:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at capacity: {self.active} sequences running or queued, this "
                                f"request needs {want} more and the limit is {self.limit} ({self.max_running} "
                                f"decode slots + --max-queue {self.config.max_queue}); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        gen = Generation(self, [list(p) for p in prompts], sampling, time.perf_counter())
        self.active += want
        self._open.add(gen)
        try:
            await asyncio.shield(self._admitter.submit(gen))
        except ConfigError as e:
            gen.close()
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # from engine.start(): the stepping thread died
            gen.close()
            raise APIError(503, f"{e}; restart the server", code="engine_failed") from None
        except BaseException:
            gen.close()
            raise
        return gen


async def watch_disconnect(receive: Any) -> None:
    """Returns when the client goes away (an ASGI `http.disconnect`); for non-streaming requests."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


__all__ = ["Backend", "Generation", "ServeConfig", "watch_disconnect"]
