"""Peer: BentoML 1.4 serving ``model.onnx`` through ``common.Classifier``, from one
batchable API, by BentoML's own server (``bentoml serve``: its circus arbiter and one
worker process).

The service is a file this module writes into ``--workdir`` under a name of its own
(``resnet_bento_peer.py``), so that BentoML's loader imports it and not this module, whose
name is ``bentoml`` too. It has one API, ``POST /classify``, with ``batchable=True``: its
one parameter is ``file: list[Path]``, a multipart field, so that a request's one ``file``
part arrives as a list of one path (BentoML saves the upload to a request temp file, its
documented file input); BentoML's adaptive-batching dispatcher joins the requests' lists
and the method calls ``Classifier.classify`` once per batch. A batchable API answers each
request with its slice of the batch's output, a list of one answer; the return type's
serializer writes that one answer itself, the shape of the service's ``/classify`` answer.

Run: ``PYTHON -m resnet_serve.bench.peers.bentoml --model-dir DIR --port PORT --workdir DIR``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from resnet_serve.bench.peers import MAX_BATCH_SIZE, arguments, become_subreaper, until_stopped

# resnet-bench's bound on a peer's shutdown is 60 s: the arbiter gets this long to stop its
# worker before whatever is left of the tree is killed.
STOP_GRACE_S = 45.0

# BentoML's max_latency_ms is not a batch window (its dispatcher learns the window from
# recent batch times) but the end-to-end bound past which queued requests are dropped
# with 503: generous, so that batching works and load is not shed, and below BentoML's
# 60 s request timeout, so that an overloaded request fails by 503 rather than by timeout.
MAX_LATENCY_MS = 10_000

SERVICE_MODULE = "resnet_bento_peer"
SERVICE_CLASS = "ResnetPeer"
MODEL_DIR_ENV = "RESNET_PEER_MODEL_DIR"
WORKERS_ENV = "RESNET_PEER_WORKERS"

# bench/peers/bentoml.txt's pin: the label is read where BentoML is not installed.
BENTOML_VERSION = "1.4.40"

LABEL = f"BentoML {BENTOML_VERSION}"
HEALTH_PATH = "/readyz"
CLASSIFY_PATH = "/classify"
DESCRIPTION = (
    "`bentoml serve` (its circus arbiter and --workers worker processes) of one service with one "
    f"batchable API: adaptive batching, max_batch_size={MAX_BATCH_SIZE}; BentoML learns its "
    "batch window from recent batch times (it has no fixed-delay knob), and "
    f"max_latency_ms={MAX_LATENCY_MS}, the end-to-end bound past which it sheds queued "
    "requests with 503, is set far above any batch's latency and under its 60 s request "
    "timeout, so that it does not shed load here. The multipart `file` arrives as a "
    "`list[Path]` of one upload (BentoML's file input, saved to a request temp file), the "
    "shared Classifier runs once per batch (one onnxruntime session per worker), and each "
    "request's one-answer slice of the batch is written as that answer (--batch-delay-ms "
    "does not apply); access log off."
)

SERVICE_SOURCE = f'''\
"""resnet-bench's BentoML peer service, written by resnet_serve.bench.peers.bentoml."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
from pydantic import PlainSerializer

from resnet_serve.bench.peers.common import Classifier


def _one_answer(answers: list[dict[str, Any]]) -> Any:
    # A batchable API answers a request with its slice of the batch's outputs, a list; a
    # request carries one image, and the contract answers it with that image's answer.
    return answers[0] if len(answers) == 1 else answers


Answers = Annotated[list[dict[str, Any]], PlainSerializer(_one_answer)]


# The access log off, as in every server of the benchmark (a line per request is work).
@bentoml.service(
    name="resnet_peer", workers=int(os.environ["{WORKERS_ENV}"]),
    logging={{"access": {{"enabled": False}}}},
)
class {SERVICE_CLASS}:
    def __init__(self) -> None:
        # Loaded before the worker accepts connections, so /readyz answers only after it.
        self.classifier = Classifier(Path(os.environ["{MODEL_DIR_ENV}"]))

    @bentoml.api(
        route="{CLASSIFY_PATH}",
        batchable=True,
        max_batch_size={MAX_BATCH_SIZE},
        max_latency_ms={MAX_LATENCY_MS},
    )
    def classify(self, file: list[Path]) -> Answers:
        return self.classifier.classify([path.read_bytes() for path in file])
'''


def main() -> None:
    import psutil  # a BentoML dependency, so in the peer's environment

    args = arguments("python -m resnet_serve.bench.peers.bentoml")
    if (installed := version("bentoml")) != BENTOML_VERSION:
        print(
            f"bentoml peer: BentoML {installed}, the label says {BENTOML_VERSION}", file=sys.stderr
        )
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{SERVICE_MODULE}.py").write_text(SERVICE_SOURCE)
    env = {
        **os.environ,
        "BENTOML_HOME": str(workdir / "bentoml-home"),
        # Usage tracking would try to reach the internet; only 127.0.0.1 is the peer's.
        "BENTOML_DO_NOT_TRACK": "True",
        MODEL_DIR_ENV: str(args.model_dir.resolve()),
        WORKERS_ENV: str(args.workers),
    }
    command = [
        sys.executable, "-m", "bentoml", "serve", f"{SERVICE_MODULE}:{SERVICE_CLASS}",
        "--host", "127.0.0.1", "--port", str(args.port), "--working-dir", str(workdir),
    ]  # fmt: skip
    become_subreaper()  # a worker whose arbiter died stays ours to stop
    # The arbiter gets a session of its own so that a terminal's Ctrl-C reaches it only
    # through us, and it is stopped one way (below); circus puts each worker in a session
    # of its own anyway, so process groups are no way to reach the tree.
    server = subprocess.Popen(command, cwd=workdir, env=env, start_new_session=True)

    stopping = until_stopped(lambda: server.poll() is None)
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)  # circus stops the worker, then itself
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=STOP_GRACE_S)
    # Whatever is left (an arbiter past its grace, workers it orphaned) is ours as subreaper.
    left = psutil.Process().children(recursive=True)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(left, timeout=10)
    if stopping:
        sys.exit(0)
    # The server ended by itself: fail as it did, a signal as a shell reports one.
    sys.exit(server.returncode if server.returncode >= 0 else 128 - server.returncode)


if __name__ == "__main__":
    main()
