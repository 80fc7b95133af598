"""The devices a model's sessions run on: which the user asked for, which onnxruntime has,
and each one's execution providers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnxruntime as ort

from resnet_serve.service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_devices(spec: str) -> list[Device]:
    """``cpu`` | ``cuda`` | ``cuda:0,1``."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return [Device("cpu")]
    if spec == "cuda":
        return [Device("cuda", 0)]
    if spec.startswith("cuda:"):
        try:
            indices = [int(i) for i in spec[5:].split(",") if i.strip()]
        except ValueError:
            indices = []
        if indices and all(i >= 0 for i in indices):
            return [Device("cuda", i) for i in dict.fromkeys(indices)]
    raise ValueError(f"device must be cpu, cuda or cuda:0,1,..., got {spec!r}")


def resolve_devices(spec: str, available: list[str] | None = None) -> list[Device]:
    """The devices to use; CUDA asked for but not present falls back to the CPU, logged."""
    devices = parse_devices(spec)
    if devices[0].kind == "cuda":
        available = available if available is not None else ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            log.warning(
                "device %s requested but onnxruntime has no CUDAExecutionProvider "
                "(providers: %s; install the `gpu` extra on a machine with CUDA): using the CPU",
                spec, ", ".join(available),
            )  # fmt: skip
            return [Device("cpu")]
    return devices


def providers_for(device: Device, settings: Settings) -> list[str | tuple[str, dict[str, str]]]:
    if device.kind == "cpu":
        return ["CPUExecutionProvider"]
    cuda = {
        "device_id": str(device.index),
        # Every batch shape is a warmed-up bucket, so an exhaustive search is paid once per
        # shape at startup and never on a request (HEURISTIC if shapes were unbounded).
        "cudnn_conv_algo_search": settings.cuda_conv_algo_search,
        "cudnn_conv_use_max_workspace": "1",
        "prefer_nhwc": "1" if settings.cuda_prefer_nhwc else "0",
        # Grow the arena by what is asked, not by doubling: the buckets' sizes are known.
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
    }
    if settings.gpu_mem_limit_bytes:
        cuda["gpu_mem_limit"] = str(settings.gpu_mem_limit_bytes)
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
