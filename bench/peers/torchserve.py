"""TorchServe as a peer of ``resnet-bench``: its Java frontend, started by its own
``torchserve --start --foreground`` launcher, and one Python backend worker running a
custom handler around ``common.Classifier``.

The model is registered at startup from a ``no-archive`` model directory made by
``torch-model-archiver``; its ``model-config.yaml`` sets the batching and the worker count.

Run: ``PYTHON -m resnet_serve.bench.peers.torchserve --model-dir DIR --port PORT --workdir DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from resnet_serve.bench.peers import MAX_BATCH_SIZE, arguments
from resnet_serve.bench.servers import free_port

LABEL = "TorchServe 0.12"
MODEL_NAME = "resnet"
MODEL_VERSION = "1.0"
CLASSIFY_PATH = f"/predictions/{MODEL_NAME}"
# TorchServe's /ping counts a worker as healthy from its start, before the handler has loaded
# the model, so readiness is asked of the worker itself: a prediction request whose trailing
# path ("ready", passed to the handler as the url_path header) the handler
# answers, and which waits in the job queue until the worker has loaded the model. (Query
# parameters would not do: /predictions/ drops them.)
HEALTH_PATH = f"/predictions/{MODEL_NAME}/{MODEL_VERSION}/ready"
# TorchServe answers 503 once this many requests wait for a worker; its default of 100 would
# turn a high-concurrency step into errors rather than queueing, which the other servers do.
JOB_QUEUE_SIZE = 1000
DESCRIPTION = (
    "TorchServe 0.12.0 (Java frontend, Python backend workers, --workers of them) with a "
    "custom handler that runs the shared Classifier (Pillow decode, one onnxruntime run per "
    f"batch, top-5); batchSize {MAX_BATCH_SIZE}, maxBatchDelay --batch-delay-ms (whole ms, "
    "at least 1: 0 makes TorchServe slow, not greedy), "
    f"a job queue of {JOB_QUEUE_SIZE}; the frontend's log at warning level without access "
    "log (the worker's, one line a batch, at info), its system-metrics sampler off."
)

# The handler TorchServe's worker imports from the model directory. The model directory it
# serves is read from model-config.yaml so that model.onnx is not copied into the archive.
HANDLER = '''"""resnet-bench's TorchServe handler, written by bench/peers/torchserve.py."""

import json


class ResNetHandler:
    def __init__(self):
        self.classifier = None

    def initialize(self, context):
        from pathlib import Path

        from resnet_serve.bench.peers.common import Classifier

        self.classifier = Classifier(Path(context.model_yaml_config["handler"]["model_dir"]))

    def handle(self, data, context):
        answers = [None] * len(data)
        images, rows = [], []
        for idx, row in enumerate(data):
            # A multipart part arrives under its form name; a raw body under "data" or "body".
            image = row.get("file") or row.get("data") or row.get("body")
            if image:
                images.append(bytes(image))
                rows.append(idx)
            elif context.get_request_header(idx, "url_path") == "ready":
                # The health probe (HEALTH_PATH): answered here, so only by a loaded worker.
                answers[idx] = json.dumps({"ready": True})
            else:
                context.set_response_status(400, "Bad Request", idx)
                answers[idx] = json.dumps({"error": "no image: send a multipart part 'file'"})
        if images:
            for idx, answer in zip(rows, self.classifier.classify(images)):
                # Compact JSON: TorchServe would serialise a dict with indent=2.
                answers[idx] = json.dumps(answer)
        for idx in range(len(data)):
            # The frontend sends no Content-Type for an answer the handler does not type.
            context.set_response_content_type(idx, "application/json")
        return answers
'''

# As the other servers of the benchmark run (warnings only, no access log): TorchServe's own
# log4j2.xml writes about ten lines per request (access log, per-request metrics, debug) to
# stdout and five files. The worker's output (MODEL_LOG, one line per batch) stays, at info,
# because the handler's tracebacks reach the frontend that way.
LOG_CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="MODEL_LOG" level="info"/>
    <Root level="warn">
      <AppenderRef ref="STDOUT"/>
    </Root>
  </Loggers>
</Configuration>
"""

# java.io.tmpdir holds the worker's Unix socket (.ts.sock.PORT), whose path is limited to
# 108 bytes; the launcher's pid file follows Python's tempfile.gettempdir().
_MAX_SOCKET_DIR = 80
_STOP_GRACE_S = 30.0
_KILL_GRACE_S = 20.0


def write_model(model_dir: Path, workdir: Path, workers: int, batch_delay_ms: float) -> Path:
    """The model store, holding the ``no-archive`` model directory ``MODEL_NAME``."""
    build = workdir / "build"
    store = workdir / "model_store"
    build.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    handler = build / "resnet_handler.py"
    handler.write_text(HANDLER, encoding="utf-8")
    config = build / "model-config.yaml"
    config.write_text(
        f"minWorkers: {workers}\n"
        f"maxWorkers: {workers}\n"
        f"batchSize: {MAX_BATCH_SIZE}\n"
        # Whole milliseconds, and at least 1: with 0 TorchServe is not greedy but slow
        # (ResNet-50, one client: 7.4 img/s and p50 134 ms, against 37 img/s and 26 ms
        # with 2; bench-results/peers/v2-r50-torchserve, 16:04).
        f"maxBatchDelay: {max(1, round(batch_delay_ms))}\n"
        "responseTimeout: 120\n"
        "handler:\n"
        f"  model_dir: {json.dumps(str(model_dir))}\n",
        encoding="utf-8",
    )
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run(
        [
            str(archiver), "--model-name", MODEL_NAME, "--version", MODEL_VERSION,
            "--handler", str(handler), "--config-file", str(config),
            "--export-path", str(store), "--archive-format", "no-archive", "--force",
        ],
        check=True,
    )  # fmt: skip
    return store


def write_config(workdir: Path, port: int, store: Path, workers: int) -> Path:
    """config.properties: every listener on 127.0.0.1, the inference API on ``port``."""
    lines = [
        f"inference_address=http://127.0.0.1:{port}",
        f"management_address=http://127.0.0.1:{free_port()}",
        f"metrics_address=http://127.0.0.1:{free_port()}",
        # gRPC cannot be switched off in 0.12; its default ports 7070/7071 could be taken.
        "grpc_inference_address=127.0.0.1",
        f"grpc_inference_port={free_port()}",
        "grpc_management_address=127.0.0.1",
        f"grpc_management_port={free_port()}",
        f"model_store={store}",
        f"load_models={MODEL_NAME}={MODEL_NAME}",
        f"default_workers_per_model={workers}",
        f"job_queue_size={JOB_QUEUE_SIZE}",
        # A psutil sampler the frontend starts every minute: monitoring, not serving, and its
        # CPU would be counted in the process tree.
        "disable_system_metrics=true",
    ]
    path = workdir / "config.properties"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow its last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the launcher's process group (launcher, Java frontend, workers), SIGKILL what
    is left after a grace period, and wait until none is alive."""
    pgid = proc.pid
    for sig, grace in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, _KILL_GRACE_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            proc.poll()  # reaps the launcher, our child, so that it counts as gone
            if not group_members(pgid):
                return
            time.sleep(0.1)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # A requested stop is not a failure; main's ``finally`` stops TorchServe.
    raise SystemExit(0)


def main() -> None:
    args = arguments("resnet_serve.bench.peers.torchserve")
    model_dir = args.model_dir.resolve()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = write_model(model_dir, workdir, args.workers, args.batch_delay_ms)
    config = write_config(workdir, args.port, store, args.workers)

    env = dict(os.environ)
    logs = workdir / "logs"
    env["LOG_LOCATION"] = env["METRICS_LOCATION"] = str(logs)
    tmp = workdir / "tmp"
    if len(str(tmp)) <= _MAX_SOCKET_DIR:
        # A private pid file and worker socket, so that another TorchServe on this machine
        # neither blocks this one ("already running") nor shares its socket path.
        tmp.mkdir(exist_ok=True)
        env["TMPDIR"] = env["TEMP"] = str(tmp)
    log_config = workdir / "log4j2.xml"
    log_config.write_text(LOG_CONFIG, encoding="utf-8")
    launcher = Path(sys.executable).with_name("torchserve")
    argv = [
        str(launcher), "--start", "--foreground",
        "--ts-config", str(config), "--model-store", str(store),
        "--log-config", str(log_config),
        "--no-config-snapshots", "--disable-token-auth",
    ]  # fmt: skip

    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    # A process group of its own, so that the frontend's workers can be stopped with it even
    # once the launcher has exited; started from the workdir, where anything relative lands.
    proc = subprocess.Popen(argv, cwd=workdir, env=env, start_new_session=True)
    try:
        code = proc.wait()
    finally:
        stop_group(proc)
    # Only a signal ends a healthy server; the launcher exits 0 even when Java failed.
    sys.exit(f"TorchServe exited by itself (launcher status {code})")


if __name__ == "__main__":
    main()
