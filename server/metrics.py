"""Every Prometheus metric of the API, defined in one place (prefix ``diffuserve_``)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("diffuserve_http_requests_total", "HTTP requests by route and status",
                   ["method", "route", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("diffuserve_http_request_duration_seconds",
                            "HTTP request latency inside the API, to the response headers (429s apart from 200s)",
                            ["method", "route", "status"], registry=REGISTRY,
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                     120, 300))
LATENCY = Histogram("diffuserve_end_to_end_seconds", "Synchronous generation latency, enqueue to result",
                    ["model"], registry=REGISTRY, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
REJECTED = Counter("diffuserve_rejected_total", "Requests refused with 429 (queue full)", ["model"],
                   registry=REGISTRY)
QUEUE_DEPTH = Gauge("diffuserve_queue_depth", "Jobs queued and not yet started", ["model"], registry=REGISTRY)
PENDING = Gauge("diffuserve_pending_jobs", "Jobs claimed by a worker and not yet acknowledged", ["model"],
                registry=REGISTRY)
LIVE_WORKERS = Gauge("diffuserve_live_workers", "Workers with a fresh heartbeat", registry=REGISTRY)


def render() -> tuple[bytes, str]:
    """This process's metrics, plus every worker's when running under ``diffuserve serve`` (multiprocess)."""
    body = generate_latest(REGISTRY)
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if mp_dir and os.path.isdir(mp_dir):
        from prometheus_client import multiprocess

        workers = CollectorRegistry()
        multiprocess.MultiProcessCollector(workers, path=mp_dir)
        body += generate_latest(workers)
    return body, CONTENT_TYPE_LATEST
