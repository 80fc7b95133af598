"""NVIDIA Triton Inference Server through PyTriton, with Triton's dynamic batcher.

PyTriton starts the ``tritonserver`` it bundles and binds a Python callable as a model:
Triton's Python backend runs a stub process that hands each batch the dynamic batcher
formed to the callable in this process (ZeroMQ plus shared memory), which runs
``Classifier.classify`` on it, one onnxruntime ``run`` per batch. The model takes the
encoded image as a BYTES tensor and answers the service's JSON, as a BYTES tensor too.

Clients speak Triton's own protocol to it, as its users do (tritonclient, perf_analyzer):
KServe V2 over HTTP on ``--port``, the image in the binary tensor extension
(``REQUEST = "v2"``). A front translating multipart would add a process and a hop of its
own, which is not Triton's cost: Triton is measured without one.

Processes, all descendants of the one running ``main``: this process (PyTriton, the
inference callable), ``tritonserver`` and its Python-backend stub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from resnet_serve.bench.peers import MAX_BATCH_SIZE, arguments
from resnet_serve.bench.servers import free_port

# Pinned in bench/peers/triton.txt; PyTriton 0.7.0 bundles tritonserver 2.51.0 (its
# GET /v2 says so).
LABEL = "Triton 2.51.0 via PyTriton 0.7.0"
HEALTH_PATH = "/v2/models/{model}/ready"
CLASSIFY_PATH = "/v2/models/{model}/infer"
REQUEST = "v2"
DESCRIPTION = (
    "NVIDIA Triton Inference Server 2.51 (CPU) started by PyTriton 0.7.0: the Python "
    f"backend hands each batch of Triton's dynamic batcher (max {MAX_BATCH_SIZE}, queue "
    "delay --batch-delay-ms, --workers model instances) to a callable running the shared "
    "onnxruntime classifier; clients send KServe V2 over HTTP, the encoded image as a "
    "binary BYTES tensor, the answer's JSON back as a (JSON) BYTES output."
)

INPUT = V2_INPUT = "image"
OUTPUT = V2_OUTPUT = "answer"
# A unix socket path has room for 107 bytes; PyTriton puts its ZeroMQ sockets, named
# after the model, in its workspace.
_SOCKET_PATH_MAX = 100
_LOG = logging.getLogger("peers.triton")


def _use_this_libpython() -> None:
    """Make Triton's Python-backend stub load this interpreter's libpython.

    The stub is linked against ``libpython3.X.so.1.0`` by soname and finds the standard
    library of the interpreter on PATH (PyTriton puts this environment's bin/ first). With
    a Python built apart from the system's (pyenv's 3.11.7 here), the loader otherwise picks
    the system's libpython (Debian's 3.11.2), whose C runtime lacks what the newer standard
    library calls (``RLock._recursion_count`` in multiprocessing's resource tracker), and
    the model fails to load. PyTriton appends its own libraries to LD_LIBRARY_PATH and
    passes the environment on to tritonserver and the stub.
    """
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return  # a static interpreter: the stub can only use the system's libpython
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        paths = [libdir, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
        os.environ["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(paths))


def _infer_function(model_dir: Path) -> Callable[[list[Any]], list[dict[str, Any]]]:
    import numpy as np

    from resnet_serve.bench.peers.common import Classifier

    classifier = Classifier(model_dir)

    def infer(requests: list[Any]) -> list[dict[str, Any]]:
        # The dynamic batcher's requests, one image each from the front (a V2 client may
        # send several): one Classifier.classify, i.e. one onnxruntime run, for them all.
        # Not PyTriton's @batch: it would concatenate BYTES arrays for nothing.
        images: list[bytes] = []
        sizes: list[int] = []
        for request in requests:
            rows = request[INPUT].reshape(-1)
            sizes.append(len(rows))
            images.extend(bytes(row) for row in rows)
        answers = classifier.classify(images)
        encoded = np.array([json.dumps(a).encode() for a in answers], dtype=np.object_)
        out: list[dict[str, Any]] = []
        start = 0
        for size in sizes:
            out.append({OUTPUT: encoded[start : start + size].reshape(size, 1)})
            start += size
        return out

    return infer


def main() -> None:
    args = arguments("resnet_serve.bench.peers.triton")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    # SIGTERM before or while Triton starts must still stop it: raise out of whatever
    # the main thread is doing, once, and clean up in the finally below.
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    _use_this_libpython()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    # Named as in the repository: resnet-bench puts the name in the paths above.
    model = args.model_dir.resolve().name
    # PyTriton wants a workspace that does not exist yet and removes it on stop.
    workspace = workdir / "pytriton"
    short_dir: Path | None = None
    if len(f"{workspace}/{model}_0_0-server.sock") > _SOCKET_PATH_MAX:
        short_dir = Path(tempfile.mkdtemp(prefix="pytriton-"))
        workspace = short_dir / "ws"
        _LOG.info("workdir too long for unix sockets: PyTriton workspace in %s", workspace)
    shutil.rmtree(workspace, ignore_errors=True)
    grpc_port, metrics_port = free_port(), free_port()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=metrics_port,
        allow_gpu_metrics=False,
        # tritonserver's own log in a file: PyTriton otherwise keeps it all in memory.
        log_file=workdir / "tritonserver.log",
    )
    _LOG.info(
        "Triton HTTP 127.0.0.1:%d, gRPC 127.0.0.1:%d, metrics http://127.0.0.1:%d/metrics",
        args.port, grpc_port, metrics_port,
    )  # fmt: skip
    triton = Triton(config=config, workspace=workspace)
    try:
        triton.bind(
            model_name=model,
            # One callable, with its own session, per model instance.
            infer_func=[_infer_function(args.model_dir) for _ in range(args.workers)],
            inputs=[Tensor(name=INPUT, dtype=bytes, shape=(1,))],
            outputs=[Tensor(name=OUTPUT, dtype=bytes, shape=(1,))],
            config=ModelConfig(
                max_batch_size=MAX_BATCH_SIZE,
                batcher=DynamicBatcher(
                    max_queue_delay_microseconds=round(args.batch_delay_ms * 1000)
                ),
            ),
        )
        triton.run()  # returns once tritonserver and the model are ready
        _LOG.info("serving http://127.0.0.1:%d%s", args.port, CLASSIFY_PATH.format(model=model))
        while not stopping.is_set():
            if not triton.is_alive():
                _LOG.error("tritonserver exited; stopping")
                break
            stopping.wait(1.0)
    finally:
        stopping.set()  # a second signal now does not interrupt the cleanup
        triton.stop()  # SIGINT to tritonserver (it stops the stub), then waits for it
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)
        _LOG.info("stopped")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
