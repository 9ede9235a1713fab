"""The service's Prometheus metrics (``GET /metrics``), in a registry of its own (one per app)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Latency buckets in seconds: a tiny model answers in milliseconds, dent on a CPU in seconds.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def size_buckets(max_batch: int) -> list[float]:
    """1, 2, 4, ... up to ``max_batch`` (included), so that every batch size formed falls in its own range."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(float(size))
        size *= 2
    return [*buckets, float(max_batch)]


class Metrics:
    """Requests by endpoint and status, batch sizes formed, latencies, and the queue depth."""

    def __init__(self, max_batch: int, queue_depth: Callable[[], float]):
        self.registry = CollectorRegistry()
        sizes = size_buckets(max_batch)
        self.requests = Counter("dent_serve_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("dent_serve_request_seconds", "POST /predict: time from arrival to answer",
                                 buckets=SECONDS, registry=self.registry)
        self.batch_images = Histogram("dent_serve_batch_images", "images per call of the defense", buckets=sizes,
                                      registry=self.registry)
        self.batch_requests = Histogram("dent_serve_batch_requests", "requests per call of the defense",
                                        buckets=sizes, registry=self.registry)
        self.batch_seconds = Histogram("dent_serve_batch_seconds", "time of one call of the defense",
                                       buckets=SECONDS, registry=self.registry)
        depth = Gauge("dent_serve_queue_depth", "requests waiting for a batch", registry=self.registry)
        depth.set_function(queue_depth)

    def observe_batch(self, images: int, requests: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
