"""All runtime options: one class, environment prefix ``RESNET_SERVE_``, units in names.

``resnet-serve --help`` and the README's options table are both rendered from these
fields (``options()``), so the CLI, the environment and the README cannot disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def cpu_count() -> int:
    # Respect CPU affinity (containers, taskset) rather than the host's core count.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# Measured (docs/benchmarks.md, "Cold start", tools/cold_start.py): with onnxruntime's
# threads sleeping between ops, a ResNet-50 run after 200 ms of quiet took 35.6 ms against
# 19.8 ms back to back (the second thread was not back in time to help); spinning: 19.4 ms.
# The tuner measures with the same choice.
CPU_SPINNING = True
# Spinning threads take the CPU that decoding needs while other requests are in flight
# (docs/benchmarks.md, "Spinning only when idle"): busy batches run on a non-spinning copy.
SPIN_UNDER_LOAD = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESNET_SERVE_", extra="ignore")

    repository: Path = Field(
        Path("model_repository"), description="model repository: <dir>/<name>/model.onnx + json"
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated models to serve",
    )
    default_model: str | None = Field(
        None,
        description="the model of /v1/classify and /v1/embed (those without a model in the "
        "path); must be served",
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="port of the KServe V2 / Triton gRPC API on --host (0: off; needs the "
        "`grpc` extra)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="server processes sharing the port (SO_REUSEPORT), each with its own "
        "sessions, batcher and event loop, the cores split between them: for small models, "
        "where one event loop is the limit",
    )
    shared_inference: bool = Field(
        False,
        description="with --workers N: one more process holds the sessions (all cores) and "
        "runs the workers' batches, batched together; the workers serve HTTP and decode",
    )
    device: str = Field("cpu", description="cpu, cuda or cuda:0,1 (no CUDA provider: cpu, logged)")
    sessions_per_device: int = Field(1, ge=1, description="onnxruntime sessions per model/device")
    intra_op_threads: int = Field(
        0, ge=0, description="threads per CPU session (0: cores / sessions, no oversubscription)"
    )
    cpu_spinning: bool = Field(
        CPU_SPINNING, description="onnxruntime's threads spin between ops instead of sleeping "
        "(off: after a quiet spell a ResNet-50 run took 1.8x as long on 2 KVM vCPUs, "
        "docs/benchmarks.md; turn it off under a CPU quota, which spinning spends)",
    )  # fmt: skip
    spin_under_load: bool = Field(
        SPIN_UNDER_LOAD, description="with --cpu-spinning, spin while other requests are in "
        "flight too (off: their batches run on a non-spinning copy of each multi-threaded CPU "
        "session, in memory too; ResNet-50 int8 at 16 clients +15%, resident 738 MB, not 561)",
    )  # fmt: skip
    cpu_affinity: bool = Field(
        False,
        description="pin each CPU session's threads to cores of their own within the allowed "
        "CPUs (each worker its slice): ResNet-50 at one client p99 -23%, at 16 clients 4% "
        "fewer img/s (docs/benchmarks.md); for a lightly loaded service that owns its CPUs",
    )
    io_binding: bool | None = Field(None, description="onnxruntime IOBinding: one copy in, one out")
    cuda_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE", description="cuDNN algorithm search, paid once per warmed bucket"
    )
    cuda_prefer_nhwc: bool = Field(False, description="CUDA provider's NHWC convolutions")
    gpu_mem_limit_bytes: int = Field(0, ge=0, description="CUDA arena limit (0: no limit)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per batch, at most")
    max_batch_delay_ms: float = Field(
        2.0, ge=0, description="a batch closes this long after its first image at the latest"
    )
    batch_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="comma-separated batch sizes batches are padded to, all warmed up; the "
        "largest must equal --max-batch-size",
    )
    warmup_all_buckets: bool | None = Field(
        None,
        description="warm every batch bucket before ready (on cuda each new shape costs a "
        "cuDNN search; on cpu one batch warms every shape, measured)",
    )
    self_check: Literal["refuse", "warn", "off"] = Field(
        "refuse",
        description="at startup, run each model on its exported reference images: refuse a "
        "model outside its recorded bounds on this CPU (exit 2), or serve it with a warning",
    )
    max_queue_images: int = Field(
        512,
        ge=1,
        description="images admitted (decoding or queued), at most; beyond it 503, and 413 for "
        "a request with more images on its own",
    )
    request_timeout_ms: float = Field(30_000, gt=0, description="per request; beyond it 504")
    latency_slo_ms: float = Field(
        1000,
        gt=0,
        description="p99 latency objective of successful inference requests: exported as "
        "resnet_serve_latency_slo_seconds, which the latency alert compares p99 with",
    )
    decode_workers: int = Field(0, ge=0, description="image decoding threads (0: one per core)")
    tuning: str = Field(
        "auto",
        description="auto: the settings measured best for this model, CPU and onnxruntime "
        "(cached; none yet: measured in the background after ready, applied at the next "
        "start); off; or a file written by resnet-bench --tune. Options given explicitly win",
    )
    tuning_budget_s: float = Field(
        60.0, gt=0, description="time the background search of --tuning auto takes, about"
    )
    jpeg_draft: bool = Field(True, description="JPEG DCT-domain downscale before resizing")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1, description="request body, at most")
    max_buffered_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="bytes of request bodies being read or held, all requests together, at "
        "most; beyond it 503, before the body is read where it declares its length",
    )
    max_images_per_request: int = Field(64, ge=1, description="images in one request, at most")
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="width x height, at most, as sent and once resized (a thin image "
        "grows when its shorter side is resized up)",
    )
    decode_timeout_ms: float = Field(
        10_000, gt=0, description="decoding one image, at most; beyond it 400"
    )
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"],
        description="comma-separated accepted image formats (Pillow names); others 415",
    )
    json_max_floats: int = Field(
        1_000_000, ge=1, description="larger answers (feature maps) are sent as .npy"
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM or Ctrl-C, time for accepted requests to finish (0: do not wait)",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="request line and headers, at most; beyond it 431"
    )
    max_headers: int = Field(100, ge=8, description="header fields in one request; beyond, 431")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection's request headers must be complete this long after it opens "
        "(or after the first byte of its next request); beyond, 408 and closed",
    )
    body_idle_timeout_s: float = Field(
        20.0,
        gt=0,
        description="the longest pause in an arriving request body; beyond, 408 and closed",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="an idle kept-alive connection is closed after this long"
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="open connections, at most; beyond, 503 at once (0: what the open-files "
        "limit allows, less 256)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated bearer tokens for /v1 and /v2",
    )
    metrics_require_key: bool = Field(False, description="also require a key for /metrics")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated CORS origins"
    )
    ui: bool = Field(True, description="serve the demo page at / and /ui")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one object per line, with request IDs"
    )
    access_log: bool = Field(
        True, description="log one line per answer (probes and scrapes: only failed ones)"
    )

    @field_validator(
        "models", "batch_buckets", "api_keys", "cors_origins", "image_formats", mode="before"
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _buckets(self) -> Settings:
        if self.batch_buckets:
            self.batch_buckets = sorted(set(self.batch_buckets))
            if self.batch_buckets[0] < 1:
                raise ValueError("batch_buckets must be positive")
            if self.batch_buckets[-1] != self.max_batch_size:
                raise ValueError("the largest of batch_buckets must equal max_batch_size")
        return self

    def buckets_for(self, device_kind: str) -> list[int]:
        """The batch sizes to pad to and warm up. On CUDA, powers of two: each new shape
        costs a cuDNN algorithm search, so shapes are few. On the CPU every size is its own
        bucket: onnxruntime's CPU kernels have no per-shape cost worth avoiding (measured:
        the first batch of 7 runs as fast as the second), while padding 9 images to 16
        would waste 44% of the compute."""
        if self.batch_buckets:
            return self.batch_buckets
        if device_kind == "cpu":
            return list(range(1, self.max_batch_size + 1))
        b, buckets = 1, []
        while b < self.max_batch_size:
            buckets.append(b)
            b *= 2
        return [*buckets, self.max_batch_size]

    def warmup_sizes(self, device_kind: str) -> list[int]:
        """The batch sizes run once before ready. On the CPU one small batch: onnxruntime
        prepacks weights when the session is created, and measured on ResNet-50 the first
        run of every other batch size was no slower than its second (docs/benchmarks.md,
        cold start); only the very first run of a session pays (arena, thread pool)."""
        warm_all = self.warmup_all_buckets
        if warm_all is None:
            warm_all = device_kind != "cpu"
        return self.buckets_for(device_kind) if warm_all else [1]

    @property
    def decode_threads(self) -> int:
        return self.decode_workers or cpu_count()


# The default as shown where it is decided at startup rather than a value (an empty list
# or None in the field): the README table and --help print these words.
_DEFAULT_IN_WORDS = {
    "models": "(all in the repository)",
    "default_model": "(the first of --models, else the repository's first by name)",
    "io_binding": "(on for cuda, off for cpu)",
    "warmup_all_buckets": "(on for cuda, off for cpu)",
    "batch_buckets": "(every size up to --max-batch-size on cpu, powers of two on cuda)",
    "api_keys": "(none: no auth)",
    "cors_origins": "(none: CORS off)",
}


@dataclass(frozen=True)
class Option:
    """One setting as a user meets it: flag, environment variable, default, meaning."""

    name: str
    flag: str
    env: str
    default: str
    description: str
    boolean: bool


def options() -> list[Option]:
    """Every setting, in declaration order, with its default as text."""
    out = []
    for name, field in Settings.model_fields.items():
        value = field.get_default(call_default_factory=True)
        if value is None or value == []:
            default = _DEFAULT_IN_WORDS[name]
        elif isinstance(value, list):
            default = ",".join(map(str, value))
        else:
            default = str(value)
        out.append(
            Option(
                name=name,
                flag="--" + name.replace("_", "-"),
                env=f"{Settings.model_config['env_prefix']}{name.upper()}",
                default=default,
                description=field.description or "",
                boolean=field.annotation in (bool, bool | None),
            )
        )
    return out


def options_table() -> str:
    """The README's options table (markdown)."""
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{o.flag}` | `{o.env}` | `{o.default}` | {o.description} |" for o in options()]
    return "\n".join(rows)
