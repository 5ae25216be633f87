"""The Prometheus metrics of the HTTP API (`GET /metrics`): requests, latency, batch sizes, pending requests.

With `querytune serve --workers N` every worker process writes its metrics to the directory named by
`PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode, set before a worker starts), and `/metrics`, on
whichever worker answers it, reports the sum over all workers.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("querytune_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("querytune_request_latency_seconds", "request latency", ["endpoint"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)  # fmt: skip
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        self.batch_size = Histogram("querytune_batch_size", "queries per model call", ["run"], buckets=sizes,
                                    registry=self.registry)  # fmt: skip
        self.request_queries = Histogram("querytune_request_queries", "queries per /predict request", buckets=sizes,
                                         registry=self.registry)  # fmt: skip
        self.pending = Gauge("querytune_pending_requests", "/predict requests waiting or running",
                             registry=self.registry, multiprocess_mode="livesum")  # fmt: skip
        self.retries = Counter("querytune_batch_retries", "batches that failed and were re-scored request by request",
                               ["run"], registry=self.registry)  # fmt: skip

    def exposition(self) -> tuple[bytes, str]:
        """The text `/metrics` answers: this process's registry, or every worker's under multiprocess mode."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @staticmethod
    def process_exited() -> None:
        """A worker stops: its live gauges leave the sum (its counters stay)."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())
