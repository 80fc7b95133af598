"""Every Prometheus metric of the service, in one registry per app instance.

Names follow Triton and text-embeddings-inference: per-stage durations (queue,
preprocess, inference), a batch-size histogram with power-of-two buckets and a queue
gauge, all prefixed ``resnet_serve_``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; fine at the low end, where a small model's whole request lives.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "resnet_serve_"
        self.requests = Counter(
            p + "requests_total", "HTTP requests by endpoint, model and status code",
            ["endpoint", "model", "status"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            p + "request_duration_seconds", "HTTP request duration, receipt to response",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.images = Counter(
            p + "images_total", "Images received for inference", ["endpoint", "model"], registry=r
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds", "Time an image waits in the queue before its batch runs",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.preprocess_duration = Histogram(
            p + "preprocess_duration_seconds", "Decode + resize + crop of one image",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            p + "inference_duration_seconds", "onnxruntime run of one batch",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            p + "batch_size", "Images per executed batch (padding excluded)",
            ["model"], buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_padding = Counter(
            p + "batch_padding_images_total", "Padding images added to reach a bucket size",
            ["model"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(p + "requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge(
            p + "queue_depth", "Images waiting for inference", ["model"], registry=r
        )
        self.rejected = Counter(
            p + "rejected_images_total", "Images refused or dropped before inference, by reason",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.inference_failures = Counter(
            p + "inference_failures_total", "Batches whose inference raised",
            ["model"], registry=r,
        )  # fmt: skip
        self.model_self_check = Gauge(
            p + "model_self_check",
            "1 when the model's outputs on its reference images are within the bounds "
            "recorded at export, 0 when not (served only with --self-check warn)",
            ["model"], registry=r,
        )  # fmt: skip
        self.time_to_ready = Gauge(
            p + "time_to_ready_seconds",
            "Seconds from the process start until every model was warmed up", registry=r,
        )  # fmt: skip
        self.model_ready = Gauge(
            p + "model_ready", "1 when the model is loaded and warmed up", ["model"], registry=r
        )
