"""Prometheus metrics. One registry per app instance (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .triton import contract

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ivvae_requests", "Requests by operation, transport and outcome",
                                ["op", "transport", "outcome"], registry=r)
        self.latency = Histogram("ivvae_request_seconds", "Request latency",
                                 ["op", "transport"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("ivvae_errors", "Errors by code", ["code"], registry=r)
        self.frames = Counter("ivvae_frames", "Video frames processed", ["op"], registry=r)
        self.frames_per_second = Gauge("ivvae_frames_per_second",
                                       "Frames/s of the last completed request", ["op"],
                                       registry=r)
        self.batch_size = Histogram("ivvae_batch_size", "Videos per model call", ["kind"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.batch_seconds = Histogram("ivvae_batch_seconds", "Model call duration", ["kind"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Counter("ivvae_cache", "Result cache lookups and writes",
                             ["event"], registry=r)
        self.in_flight = Gauge("ivvae_in_flight_requests", "Requests being served",
                               registry=r)
        self.active_sessions = Gauge("ivvae_active_sessions",
                                     "Backend sessions (videos mid-encode or mid-decode) open",
                                     ["kind"], registry=r)
        # A session that is not closed leaves its feature cache here until its time-to-live.
        # The same names as the Triton models' own (on Triton's metrics port).
        self.open_sequences = Gauge(contract.OPEN_SEQUENCES_METRIC,
                                    "Feature caches held in this process (local backend)",
                                    ["model", "direction"], registry=r)
        self.evicted_sequences = Gauge(contract.EVICTED_SEQUENCES_METRIC,
                                       "Sequences dropped after their time-to-live without a "
                                       "step (local backend)", ["model", "direction"],
                                       registry=r)

    def watch_cache(self, problems: Callable[[], Mapping[str, int]]) -> None:
        """Export the cache's own problem counters (``CacheStats.problems``: kind -> count),
        read at each scrape: a cache that misses for a reason says which."""
        self.registry.register(_CacheProblems(problems))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheProblems(Collector):
    def __init__(self, problems: Callable[[], Mapping[str, int]]) -> None:
        self.problems = problems

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "ivvae_cache_problems", "Cache misses and unstored writes by reason: corrupt "
            "entries (dropped), backend errors, writes refused, skipped while the backend "
            "was down, entries too large", labels=["kind"])
        for kind, count in self.problems().items():
            family.add_metric([kind], count)
        yield family
