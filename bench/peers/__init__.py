"""Peer servers for ``resnet-bench --peer NAME=PYTHON``: the serving frameworks users
compare resnet-serve with, each serving the same ``model.onnx`` with onnxruntime, the
same Pillow preprocessing (``common.Classifier``) and its own batching switched on.

A peer NAME is the module ``bench/peers/NAME.py``. Its framework is not one of ours to
install (they pin conflicting versions of FastAPI, pydantic and each other), so each runs
in an environment of its own: ``tools/peer_env.sh NAME DIR`` makes one from
``bench/peers/NAME.txt`` (the framework, pinned; onnxruntime at the version resnet-serve
runs) plus this repository without its dependencies. ``resnet-bench`` then starts

    PYTHON -m resnet_serve.bench.peers.NAME --model-dir DIR --port PORT --workdir DIR

(and ``--workers N --batch-delay-ms D`` as ``--peer-arg`` gives them) and waits for
``GET HEALTH_PATH`` to answer 200. Every peer listens on 127.0.0.1 only and
answers ``POST CLASSIFY_PATH`` (``{model}`` in it: the model's name in the repository)
with one image, as its users send one: ``REQUEST = "multipart"`` (the default), one
multipart ``file`` part answered by ``{"model": ..., "results": [{"predictions":
[{"index", "label", "score"}, ...]}]}``, the shape of the service's own ``/classify``
answer; or ``REQUEST = "v2"`` (a server that speaks KServe V2, Triton), a binary-tensor
V2 request with the encoded image as the ``[1, 1]`` BYTES input ``V2_INPUT``, answered
with that JSON as the BYTES output ``V2_OUTPUT``. ``RAW_BODY = True``: it also takes the
image itself as the body (``application/octet-stream`` or ``image/*``), for
``resnet-bench --body raw``. The module keeps its framework's imports
inside ``main`` so that resnet-bench can read these constants and ``DESCRIPTION`` without
the framework installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType

# The service's largest batch (--max-batch-size), for every framework.
MAX_BATCH_SIZE = 32
# How long a framework's batcher waits for more requests (--batch-delay-ms). resnet-serve
# waits (up to --max-batch-delay-ms) only while requests it has accepted are still being
# read and decoded, and sends a lone request at once; a fixed wait has no such rule, so by
# default the peers batch greedily: whatever has queued while the model was busy.
BATCH_DELAY_MS = 0.0
# The environment the shared Classifier reads, set by ``arguments`` so that a framework's
# worker processes inherit it: onnxruntime intra-op threads per worker (0: onnxruntime's
# own choice, one per core), so that N workers split the cores as `resnet-serve --workers
# N` does instead of oversubscribing them.
INTRA_OP_THREADS_ENV = "RESNET_PEER_INTRA_OP_THREADS"

NAMES = ("torchserve", "ray", "bentoml", "triton", "floor")


@dataclass(frozen=True)
class Peer:
    name: str
    label: str  # the report's row label
    health_path: str
    classify_path: str
    description: str
    request: str = "multipart"  # | "v2"
    v2_tensors: tuple[str, str] = ("", "")  # with "v2": (V2_INPUT, V2_OUTPUT)
    raw_body: bool = False  # also takes the image itself as the body (resnet-bench --body raw)


def peer(name: str) -> Peer:
    if name not in NAMES:
        raise ValueError(f"unknown peer {name!r} (one of {', '.join(NAMES)})")
    module: ModuleType = importlib.import_module(f"{__name__}.{name}")
    request = getattr(module, "REQUEST", "multipart")
    tensors = (module.V2_INPUT, module.V2_OUTPUT) if request == "v2" else ("", "")
    return Peer(
        name, module.LABEL, module.HEALTH_PATH, module.CLASSIFY_PATH, module.DESCRIPTION,
        request, tensors, getattr(module, "RAW_BODY", False),
    )  # fmt: skip


def become_subreaper() -> bool:
    """Have the processes a framework orphans (a worker whose parent died) re-parented to
    this process rather than to init (Linux): they stay in the process tree resnet-bench
    measures, and are this process's to stop. Whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_child_subreaper = 36
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0


def until_stopped(running: Callable[[], bool]) -> bool:
    """Wait while ``running()`` holds and no SIGTERM or SIGINT came (the signals set a flag,
    so that the caller stops what it started, its own way); whether a signal came."""
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while running() and not stopping:
        time.sleep(0.2)
    return stopping


def arguments(prog: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line every peer module takes."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--model-dir", type=Path, required=True, help="<repository>/<model>")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--workdir", type=Path, required=True,
        help="scratch space the framework may write (archives, configs, logs)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1,
        help="model workers / replicas / instances, each with its own onnxruntime session "
        "and cores // N intra-op threads (default 1, onnxruntime's own thread count)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-delay-ms", type=float, default=BATCH_DELAY_MS,
        help="the framework's batch wait where it has one (default 0: greedy)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.workers < 1 or args.batch_delay_ms < 0:
        parser.error("--workers must be positive and --batch-delay-ms not negative")
    if args.workers > 1:
        cores = len(os.sched_getaffinity(0))
        os.environ[INTRA_OP_THREADS_ENV] = str(max(1, cores // args.workers))
    return args
