"""Self-tuning by measurement: per model and machine, the settings that matter on a CPU
(max batch size, intra-op threads against decode threads, sessions per device), chosen by
running the model's own pipeline on this machine, and cached.

What Triton's Model Analyzer does offline, here done by the server (``--tuning auto``: in
the background after ready when the cache has nothing for this machine) or ahead of time
(``resnet-bench --tune``). A choice is keyed by what decides the speed: the CPU (model
name and flags), the core count, onnxruntime's version and the model file's sha256. A key
that differs is not used (``auto``), or used with a warning (``--tuning FILE``).

The search (service/tuner.py), bounded by a time budget: (1) onnxruntime alone per batch
size, all cores, to find the batch sizes worth trying (on CPUs a big CNN often gains nothing
from large batches); (2) the pipeline, decode threads feeding full batches to the sessions,
for each split of the cores between sessions, intra-op threads and decode threads, at those
batch sizes. The best throughput as served (the pipeline's, with the service's own CPU
per batch added: ``tuner.served_img_s``) whose batch latency (p50) stays under the bound
wins; within 2% of it, the smaller batch and fewer threads (lower latency, less
contention). A choice made by an older rule (``SELECTION`` in its key) is not used by
``auto``, which measures again.

Settings given explicitly (flag or environment) are never overridden by a tuned choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from resnet_serve.service.repository import ModelSpec, RepositoryError
from resnet_serve.service.settings import Settings, cpu_count

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
# The rule that picked a choice, part of its key: 2 compares candidates as served (before,
# on offline throughput alone, batches came out too small for the service).
SELECTION = 2
TUNED_FIELDS = ("max_batch_size", "intra_op_threads", "sessions_per_device", "decode_workers")


class TuningError(RepositoryError):
    """A tuning file that cannot be read or does not fit this model: refused at startup
    like a bad repository (exit 2)."""


@dataclass
class Choice:
    """A tuned configuration for one model on one machine, as cached and reported."""

    model: str
    key: dict[str, Any]
    settings: dict[str, int]
    img_s: float
    batch_p50_ms: float
    latency_bound_ms: float
    measured_at: str
    seconds: float
    measured: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""  # where this process found it (not stored)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d

    def report(self) -> dict[str, Any]:
        """What ``/v1/models/{m}`` shows."""
        return {
            "source": self.source, "settings": self.settings, "img_s": round(self.img_s, 1),
            "batch_p50_ms": round(self.batch_p50_ms, 2), "measured_at": self.measured_at,
        }  # fmt: skip


def _cpu_flags() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "model name" and not model.startswith(value.strip()):
                    model = value.strip()
                if name.strip() == "flags":
                    flags = " ".join(sorted(value.split()))
                    break
    except OSError:
        pass
    return model, flags


def machine_key(spec: ModelSpec) -> dict[str, Any]:
    import onnxruntime as ort

    model, flags = _cpu_flags()
    sha = spec.metadata.get("onnx_sha256")
    if not sha:
        sha = hashlib.sha256(spec.onnx_path.read_bytes()).hexdigest()
    return {
        "cpu": model,
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "cpus": cpu_count(),
        "onnxruntime": ort.__version__,
        "model_sha256": sha,
        "selection": SELECTION,
    }


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resnet-serve" / "tuning"


def cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{digest}.json"


def save(choices: Sequence[Choice], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format_version": FORMAT_VERSION, "choices": [c.to_json() for c in choices]}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a file


def load_file(path: Path) -> list[Choice]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format_version") != FORMAT_VERSION:
            raise TuningError(f"{path}: format_version {doc.get('format_version')} unknown")
        return [Choice(**c) for c in doc["choices"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TuningError(f"cannot read the tuning file {path}: {exc}") from None


def find(spec: ModelSpec, settings: Settings) -> tuple[Choice | None, bool]:
    """The choice for this model under ``settings.tuning``, and whether ``auto`` found
    nothing (so that it may measure in the background)."""
    mode = settings.tuning
    if mode == "off":
        return None, False
    key = machine_key(spec)
    if mode == "auto":
        path = cache_path(key)
        if not path.is_file():
            return None, True
        try:
            found = [c for c in load_file(path) if c.key == key]
        except TuningError as exc:
            log.warning("%s: %s; measuring again", spec.name, exc)
            return None, True
        if not found:
            return None, True
        found[0].source = f"cache {path}"
        return found[0], False
    path = Path(mode)
    mine = [c for c in load_file(path) if c.key.get("model_sha256") == key["model_sha256"]]
    if not mine:
        raise TuningError(f"{path} has no tuning for model {spec.name} (this model.onnx)")
    choice = next((c for c in mine if c.key == key), mine[0])
    if choice.key != key:
        differs = [k for k in key if choice.key.get(k) != key[k]]
        log.warning(
            "%s: the tuning in %s was measured elsewhere or chosen by an older search (%s "
            "differ): applied anyway",
            spec.name, path, ", ".join(differs),
        )  # fmt: skip
    choice.source = str(path)
    return choice, False


def apply(choice: Choice | None, settings: Settings) -> Settings:
    """``settings`` with the tuned values of the fields the user did not set."""
    if choice is None:
        return settings
    update = {k: v for k, v in choice.settings.items() if k not in settings.model_fields_set}
    if "max_batch_size" in update and settings.batch_buckets:
        update.pop("max_batch_size")  # buckets given explicitly end at their own maximum
    return settings.model_copy(update=update)
