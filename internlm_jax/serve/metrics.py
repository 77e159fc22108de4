"""Prometheus metrics of one server (own registry, so several apps can live in one process).

Counters and histograms are updated on the request path; engine state (queue depth, KV pages, prefix hit
rate, compilations since warm-up) is read from `engine.stats()` at scrape time by a custom collector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "internlm_jax"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                1.0, 2.5)


class _EngineCollector:
    """Gauges read from the engine (and the server) each scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        st = self._stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))

        yield gauge("num_requests_running", "Sequences holding a decode slot", st.get("running", 0))
        yield gauge("num_requests_waiting", "Sequences queued in the engine (queue depth)", st.get("waiting", 0))
        yield gauge("http_requests_in_flight", "Generation sequences admitted by the HTTP server and not done",
                    st.get("server_active", 0))
        yield gauge("kv_pages_used", "KV cache pages referenced by live sequences", st.get("pages_used", 0))
        yield gauge("kv_pages_total", "KV cache pages in the pool", st.get("pages_total", 0))
        yield gauge("kv_pages_cached", "Pages registered in the prefix cache", st.get("pages_cached", 0))
        yield gauge("kv_cache_usage_ratio", "pages_used / pages_total",
                    st.get("pages_used", 0) / max(1, st.get("pages_total", 1)))
        yield gauge("prefix_cache_hit_rate", "Fraction of admitted prompt tokens served from the prefix cache",
                    st.get("prefix_hit_rate", 0.0))
        yield gauge("compilations_since_warmup", "XLA compilations on the engine's request path after "
                    "warm-up (should stay 0)", st.get("compilations", 0))
        yield gauge("scoring_compilations", "Compiled shapes of the prompt-logprob forward (echo/logprobs)",
                    st.get("scoring_compiles", 0))
        yield counter("preemptions", "Sequences preempted for lack of KV pages", st.get("preemptions", 0))
        yield counter("engine_steps", "Engine steps run", st.get("steps", 0))


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP API requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter(f"{PREFIX}_requests_rejected", "Requests refused because the queue was full",
                                registry=r)
        self.aborted = Counter(f"{PREFIX}_requests_aborted", "Requests aborted by a client disconnect",
                               registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between tokens of one sequence",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with labels, as printed) -> value; a small reader for tests and the bench."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


__all__ = ["PREFIX", "ServerMetrics", "parse_metrics"]
