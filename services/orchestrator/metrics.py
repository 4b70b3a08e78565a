"""Prometheus metrics of the job path: what the gateway accepts and refuses, what workers finish."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.rpc.metrics import serve_registry

# A job on a GPU takes seconds (512 px) to minutes (1024 px, think mode); on a CPU, longer.
_JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, queue_depth=None):
        self.submitted = Counter("bagel_jobs_submitted", "job submissions, by workflow and result "
                                 "(accepted, duplicate, refused)", ["workflow", "result"], registry=registry)
        self.http_requests = Counter("bagel_http_requests", "HTTP requests, by route and status",
                                     ["route", "status"], registry=registry)
        if queue_depth is not None:
            gauge = Gauge("bagel_jobs_queued", "job messages waiting in the queue", registry=registry)
            gauge.set_function(lambda: _or_nan(queue_depth))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.finished = Counter("bagel_jobs_finished", "jobs ended by this worker, by workflow and state",
                                ["workflow", "state"], registry=r)
        self.seconds = Histogram("bagel_job_seconds", "a job's run time in the worker (first start to end)",
                                 ["workflow", "state"], buckets=_JOB_BUCKETS, registry=r)
        self.retries = Counter("bagel_job_retries", "transient failures retried, by status code", ["code"],
                               registry=r)
        self.running = Gauge("bagel_jobs_running", "jobs this worker runs now", registry=r)
        self.rescued = Counter("bagel_jobs_rescued", "jobs queued again by this worker's janitor because "
                               "their worker stopped renewing its lease", registry=r)
        self.objects_deleted = Counter("bagel_objects_deleted", "job objects deleted from the bucket "
                                       "(intermediates at the job's end, the rest when its record expires)",
                                       registry=r)
        self._http = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int | None:
        self._http, bound = serve_registry(self.registry, port, host)
        return bound


def _or_nan(read) -> float:
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is away
        return math.nan
