"""Prometheus metrics of one server instance (its own registry: two apps in a process never mix counts)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_BATCH = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cosyjax_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("cosyjax_request_latency_seconds", "time to the last byte of a speech response",
                                 ["mode"], buckets=_LATENCY, registry=r)
        self.ttfa = Histogram("cosyjax_time_to_first_audio_seconds", "time from request to its first audio byte",
                              ["mode"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("cosyjax_batch_size", "segments per batched engine call (before padding)",
                                    buckets=_BATCH, registry=r)
        self.batch_rows = Histogram("cosyjax_batch_rows", "rows per batched engine call (after bucket padding)",
                                    buckets=_BATCH, registry=r)
        self.batch_seconds = Histogram("cosyjax_batch_seconds", "wall time of one batched engine call",
                                       buckets=_LATENCY, registry=r)
        self.audio_seconds = Counter("cosyjax_audio_seconds", "seconds of audio produced", ["mode"], registry=r)
        self.streams_cancelled = Counter("cosyjax_streams_cancelled", "streams dropped because the client left",
                                         registry=r)
        self.stream_errors = Counter("cosyjax_stream_errors", "streams that failed after their 200 was sent",
                                     registry=r)
        self.active_streams = Gauge("cosyjax_active_streams", "streams being synthesised", registry=r)
        self.queue_depth = Gauge("cosyjax_queue_segments", "non-streaming segments waiting for a batch", registry=r)

    def on_batch(self, n: int, rows: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
