"""`/metrics`: the server's numbers in the Prometheus text format (prometheus_client, one registry per app).

    lion_queue_depth                   requests waiting for a decoding slot
    lion_active_requests               requests decoding now
    lion_batch_size                    rows per decoder step (continuous) or requests per batch (request)
    lion_generated_tokens_total        answer tokens produced
    lion_tokens_per_second             answer tokens per second over the last `window_s` seconds
    lion_request_latency_seconds       request arrival to last byte, by endpoint and outcome
    lion_time_to_first_token_seconds   request arrival to the first answer text
    lion_requests_total                requests answered, by endpoint and HTTP status
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]


class _TokenRate:
    """Tokens per second over a sliding window (thread-safe)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), tokens))

    def rate(self) -> float:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            while self._events and self._events[0][0] < cutoff:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


class ServerMetrics:
    """The metrics of one server; `observe_step` is called by the scheduler thread, the rest by handlers."""

    def __init__(self, max_batch_size: int, window_s: float = 10.0):
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue_depth = Gauge("lion_queue_depth", "Requests waiting for a decoding slot", registry=self.registry)
        self.active = Gauge("lion_active_requests", "Requests decoding now", registry=self.registry)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size} - {0})
        self.batch_size = Histogram("lion_batch_size", "Rows per decoder step (continuous batching) or requests "
                                    "per generate call (request-level batching)", buckets=[s for s in sizes
                                                                                           if s <= max_batch_size],
                                    registry=self.registry)
        self.tokens = Counter("lion_generated_tokens", "Answer tokens produced", registry=self.registry)
        self._rate = _TokenRate(window_s)
        self.tokens_per_second = Gauge("lion_tokens_per_second",
                                       f"Answer tokens per second over the last {window_s:g} s", registry=self.registry)
        self.tokens_per_second.set_function(self._rate.rate)
        self.latency = Histogram("lion_request_latency_seconds", "Request arrival to the end of its answer",
                                 ["endpoint", "outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("lion_time_to_first_token_seconds", "Request arrival to its first answer text",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("lion_requests", "Requests answered", ["endpoint", "status"], registry=self.registry)

    def watch(self, queue_depth: Callable[[], float], active: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.active.set_function(active)

    def observe_step(self, rows: int, tokens: int) -> None:
        self.batch_size.observe(rows)
        if tokens:
            self.tokens.inc(tokens)
            self._rate.add(tokens)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint, "ok" if status < 400 else "error").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
