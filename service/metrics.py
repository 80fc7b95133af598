"""Every Prometheus metric of the service, in one registry per app instance.

Names follow Triton and text-embeddings-inference: per-stage durations (queue,
preprocess, inference), a batch-size histogram with power-of-two buckets and a queue
gauge, all prefixed ``resnet_serve_``. Every per-model series exists, at 0, from the
start (``add_model``): a panel or an ``increase()`` alert sees the first event, not only
the second.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from resnet_serve.service.metric_values import Labeled, LiveGauges, Refreshing, multiprocess
from resnet_serve.service.stats import Stats

# Seconds; fine at the low end, where a small model's whole request lives.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096
# The endpoints that run a model, and the statuses each answers; their series are created
# at 0 for every served model. /v2 turns /v1's 422 into a 400.
INFERENCE_STATUSES = {
    "classify": ("200", "400", "413", "415", "422", "500", "503", "504"),
    "embed": ("200", "400", "413", "415", "422", "500", "503", "504"),
    "v2_infer": ("200", "400", "413", "415", "500", "503", "504"),
    # gRPC answers are counted with the HTTP status of V2's table row (service.errors), so
    # that one status-class alert covers every protocol.
    "grpc_infer": ("200", "400", "413", "415", "500", "503", "504"),
}
# The `endpoint` label of gRPC requests, one per kind of RPC (HTTP's are app.ENDPOINTS).
GRPC_ENDPOINTS = ("grpc_infer", "grpc_model", "grpc_server", "grpc_health")
REJECT_REASONS = ("queue_full", "cancelled", "client_gone")
# Why a connection was refused or closed before its request reached the application
# (service/connections.py).
CONNECTION_REFUSALS = (
    "too_many_connections", "header_too_large", "too_many_headers", "header_timeout",
    "body_timeout",
)  # fmt: skip


def status_class(status: int) -> str:
    """200 -> "2xx": the latency histogram's label, a handful of values."""
    return f"{status // 100}xx"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """``registry`` is what ``/metrics`` exposes. Under ``--workers`` (multiprocess mode)
    it holds one collector that reads every worker's files, and the metrics below write to
    this process's file; a gauge's ``multiprocess_mode`` says how workers combine: ``sum``
    for quantities (in flight, queued, sessions), ``max`` for settings and facts, ``min`` for
    readiness (a model is ready when it is ready in every worker); ``live``: the values of
    a worker that ended go with it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = registry is None and multiprocess()
        self.live = LiveGauges(self.multiprocess)
        if self.multiprocess:
            self.registry = CollectorRegistry()
            Refreshing(self.registry, self.live.refresh)
            r: CollectorRegistry | None = None  # the files are the storage
        else:
            self.registry = registry or CollectorRegistry()
            r = self.registry
        # Triton's statistics extension: counters the batcher feeds beside these metrics
        # (per process: under --workers, those of the worker that answers).
        self.stats = Stats()
        p = "resnet_serve_"

        def gauge(
            name: str, doc: str, labels: tuple[str, ...] = ("model",), mode: str = "livesum"
        ) -> Gauge:
            return Gauge(p + name, doc, list(labels), registry=r, multiprocess_mode=mode)  # type: ignore[arg-type]

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("model",)) -> Counter:
            return Counter(p + name, doc, list(labels), registry=r)

        def histogram(
            name: str,
            doc: str,
            labels: tuple[str, ...] = ("model",),
            buckets: tuple[float, ...] = LATENCY_BUCKETS,
        ) -> Histogram:
            return Histogram(p + name, doc, list(labels), buckets=buckets, registry=r)

        self.requests = counter(
            "requests_total",
            "HTTP answers by endpoint, model and status code: every answer, probes and "
            'unknown paths (endpoint="unknown") included',
            ("endpoint", "model", "status"),
        )
        self.request_duration = histogram(
            "request_duration_seconds",
            "HTTP request duration, receipt to response, of the /v1 and /v2 endpoints; "
            'status_class="2xx" for successful answers alone',
            ("endpoint", "model", "status_class"),
        )
        self.images = counter(
            "images_total", "Images received for inference", ("endpoint", "model")
        )
        # The per-request series, by their labels' values (``Labeled``).
        self.requests_of = Labeled(self.requests)
        self.request_duration_of = Labeled(self.request_duration)
        self.images_of = Labeled(self.images)
        self.queue_wait = histogram(
            "queue_wait_seconds", "Time an image waits in the queue before its batch runs"
        )
        self.preprocess_duration = histogram(
            "preprocess_duration_seconds", "Decode + resize + crop of one image"
        )
        self.preprocess_duration_of = Labeled(self.preprocess_duration)
        self.inference_duration = histogram(
            "inference_duration_seconds", "onnxruntime run of one batch"
        )
        self.batch_size = histogram(
            "batch_size", "Images per executed batch (padding excluded)", buckets=BATCH_BUCKETS
        )
        self.batch_padding = counter(
            "batch_padding_images_total", "Padding images added to reach a bucket size"
        )
        self.in_flight = gauge("requests_in_flight", "HTTP requests being handled", ())
        # Counted by the front ends in a plain int, read into the gauge when scraped: a
        # gauge's inc and dec cost about ten Python calls a request on the event loop.
        self.requests_in_flight = 0
        self.live.add(self.in_flight, lambda: self.requests_in_flight)
        self.connections = gauge("connections", "Open HTTP connections", ())
        self.max_connections = gauge(
            "max_connections", "HTTP connections open at most (--max-connections); beyond, 503", ()
        )
        self.connections_refused = counter(
            "connections_refused_total",
            "HTTP connections refused or closed before a request reached the application: "
            "too many open, headers too large or too many, headers or body too slow",
            ("reason",),
        )
        for reason in CONNECTION_REFUSALS:
            self.connections_refused.labels(reason)
        self.queue_depth = gauge("queue_depth", "Images waiting for inference")
        self.admitted = gauge(
            "admitted_images",
            "Images admitted and not yet in a batch: being decoded or queued (what "
            "--max-queue-images limits; queue_depth counts only the queued ones)",
        )
        self.max_queue_images = gauge(
            "max_queue_images", "Images admitted at most (--max-queue-images); beyond, 503"
        )
        self.max_batch_size = gauge(
            "max_batch_size",
            "Images per batch at most (the largest batch bucket)",
            mode="livemax",
        )
        self.sessions = gauge(
            "sessions", "onnxruntime sessions of the model (devices x sessions per device)"
        )
        self.sessions_healthy = gauge(
            "sessions_healthy",
            "Sessions able to run; a session that failed and could not be recreated is "
            "retired, and at 0 the model is not ready",
        )
        self.rejected = counter(
            "rejected_images_total",
            "Images refused or dropped before inference, by reason",
            ("model", "reason"),
        )
        self.inference_failures = counter(
            "inference_failures_total", "Batches whose inference raised"
        )
        self.model_self_check = gauge(
            "model_self_check",
            "1 when the model's outputs on its reference images are within the bounds "
            "recorded at export, 0 when not (served only with --self-check warn)",
            mode="livemin",
        )
        self.time_to_ready = gauge(
            "time_to_ready_seconds",
            "Seconds from the process start until every model was warmed up",
            (),
            mode="livemax",
        )
        self.model_ready = gauge(
            "model_ready",
            "1 when the model is warmed up and has a healthy session, else 0",
            mode="livemin",
        )
        self.model_info = gauge(
            "model_info",
            "Always 1: the model's precision (fp32, fp16, int8)",
            ("model", "precision"),
            mode="livemax",
        )
        self.build_info = gauge(
            "build_info",
            "Always 1: the service's version, onnxruntime's, the execution provider in use "
            "and Python's",
            ("version", "onnxruntime", "provider", "python"),
            mode="livemax",
        )
        self.latency_slo = gauge(
            "latency_slo_seconds",
            "The p99 latency objective of successful inference requests (--latency-slo-ms), "
            "for the latency alert to compare with",
            (),
            mode="livemax",
        )

    def set_build_info(self, provider: str) -> None:
        self.build_info.labels(
            _version("resnet-serve"), _version("onnxruntime"), provider,
            platform.python_version(),
        ).set(1)  # fmt: skip

    def add_model(
        self,
        name: str,
        *,
        precision: str,
        max_queue_images: int,
        max_batch_size: int,
        sessions: int,
        admitted: Callable[[], float],
        queued: Callable[[], float],
        healthy_sessions: Callable[[], float],
        ready: Callable[[], float],
    ) -> None:
        """A served model's limits and state, and every one of its counters and histograms
        at 0. The callables are read at each scrape (the queue's length too: setting a
        gauge at every change was Python work per image on the event loop)."""
        self.model_info.labels(name, precision).set(1)
        self.stats.add_model(name)
        self.max_queue_images.labels(name).set(max_queue_images)
        self.max_batch_size.labels(name).set(max_batch_size)
        self.sessions.labels(name).set(sessions)
        self.live.add(self.admitted.labels(name), admitted)
        self.live.add(self.sessions_healthy.labels(name), healthy_sessions)
        self.live.add(self.model_ready.labels(name), ready)
        self.live.add(self.queue_depth.labels(name), queued)
        for endpoint, statuses in INFERENCE_STATUSES.items():
            self.images.labels(endpoint, name)
            self.request_duration.labels(endpoint, name, "2xx")
            for status in statuses:
                self.requests.labels(endpoint, name, status)
        for reason in REJECT_REASONS:
            self.rejected.labels(name, reason)
        for family in (self.queue_wait, self.preprocess_duration, self.inference_duration,
                       self.batch_size, self.batch_padding, self.inference_failures):  # fmt: skip
            family.labels(name)
