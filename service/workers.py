"""``--workers N``: N server processes on one port, for models small enough that one
event loop (HTTP parsing, routing, JSON) is the bottleneck rather than the engine.

The first process is a supervisor: it reserves the address (``service.cli.bind`` with
``SO_REUSEPORT``: a socket that never listens, so it takes no connections; port 0 resolves
there, once, for every worker), then starts N copies
of ``resnet-serve``, each binding the same address with ``SO_REUSEPORT`` and listening on
its own socket: the kernel spreads new connections over them, each with its own sessions,
batcher, decode pool and event loop. The cores are split between them (intra-op and decode
threads = cores / N unless set), so they do not oversubscribe the CPU.

Metrics: prometheus-client's multiprocess mode. The supervisor gives every worker one
``PROMETHEUS_MULTIPROC_DIR``; each worker's ``/metrics`` reads all of them (counters and
histograms summed, gauges per their ``multiprocess_mode``), so a scrape is the service's
totals whichever worker answers it.

Signals: SIGTERM or SIGINT to the supervisor is passed on to every worker, which drains as
one process does (readiness 503, in-flight requests answered); the supervisor exits 0 once
all of them did. A worker that exits on its own ends the others and the supervisor with its
exit code: the orchestrator restarts the whole, as it would restart one process.

``--shared-inference``: the supervisor also starts one inference process
(service/inference_host.py) with the onnxruntime sessions, created as a single process
creates them (all the cores), listening on a Unix socket in a directory of its own. The
workers parse, decode and batch as above, but their sessions are remote runners
(service/remote.py) sending each batch there, where batches from different workers that
wait at the same time run as one. Workers are ready once their self-check and warmup went
through it; on SIGTERM they drain first, then it stops. If it dies, runs fail (503) and the
supervisor ends the workers and exits non-zero, as for a worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from resnet_serve.service.metric_values import clear_files
from resnet_serve.service.settings import Settings, cpu_count

log = logging.getLogger(__name__)
# Set in the environment of the processes the supervisor starts: their worker index.
WORKER_ENV = "_RESNET_SERVE_WORKER"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Where each worker leaves a file once ready, and how many workers there are: a worker is
# ready (``/readyz``) when all are, whichever of them a probe's connection reaches.
READY_DIR_ENV = "_RESNET_SERVE_READY_DIR"
COUNT_ENV = "_RESNET_SERVE_WORKERS"
# The inference process's Unix socket, set for every process under --shared-inference.
INFERENCE_SOCKET_ENV = "_RESNET_SERVE_INFERENCE_SOCKET"


def worker_index() -> int | None:
    """This process's index among the workers, or None outside ``--workers``."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


class WorkerTag(logging.Filter):
    """Every log record of a worker carries its index (``worker`` in the JSON lines): the
    workers share one output."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def tag_logs() -> None:
    """In a worker, tag what the root logger's handlers write (nothing outside one)."""
    index = worker_index()
    if index is not None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(WorkerTag(index))


def mark_ready(ready: bool = True) -> None:
    """This worker is ready, or no longer is (a model lost its last session); workers only."""
    index, path = worker_index(), os.environ.get(READY_DIR_ENV)
    if index is not None and path:
        if ready:
            (Path(path) / str(index)).touch()
        else:
            (Path(path) / str(index)).unlink(missing_ok=True)


def peers_ready() -> bool:
    """Whether every worker is ready (True outside ``--workers``), read at each call: a
    worker whose model broke takes its mark back, and then no worker answers ready."""
    path = os.environ.get(READY_DIR_ENV)
    if worker_index() is None or not path:
        return True
    return len(os.listdir(path)) >= int(os.environ.get(COUNT_ENV, "1"))


def split_threads(settings: Settings) -> dict[str, str]:
    """The environment that splits the cores among the workers: threads the user did not
    set become cores / workers (at least one), for onnxruntime (per session) and decoding.
    Given explicitly to the workers, a tuned choice does not override them (only its batch
    size applies). Under ``--shared-inference`` the workers create no sessions (the
    inference process's threads are its own), so their share of the cores is all decoding."""
    per_worker = max(1, cpu_count() // settings.workers)
    env = {}
    if settings.intra_op_threads == 0 and not settings.shared_inference:
        env["RESNET_SERVE_INTRA_OP_THREADS"] = str(
            max(1, per_worker // settings.sessions_per_device)
        )
    if settings.decode_workers == 0:
        env["RESNET_SERVE_DECODE_WORKERS"] = str(per_worker)
    # Fixed too, so that a tuning measured for the whole machine (service/tuning.py) does not
    # multiply sessions across workers whose threads are already split.
    env["RESNET_SERVE_SESSIONS_PER_DEVICE"] = str(settings.sessions_per_device)
    return env


# Above this many images a second offline (the tuning's own measure), an image's CPU in the
# model is under 1 ms on the whole machine, and what HTTP, parsing and the event loop take
# around one image (about 0.25 ms of one core, docs/benchmarks.md "where a request's CPU
# goes") is a quarter of it or more: one event loop per session pays. Below, the loop is not
# the limit, and one queue for all sessions serves unevenly spread connections better
# (SO_REUSEPORT hands each worker its own; ResNet-50, 16 clients: the same img/s, one
# round's p99 549 ms against 331).
LOOP_BOUND_IMG_S = 1000.0


def tuned_layout(settings: Settings) -> Settings:
    """``settings`` with the process layout that ``--tuning`` chose: a choice of one session
    per core with one intra-op thread each (what the search finds best for small models) is
    served as that many worker processes of one session each, not as that many sessions
    in one process, where every session's decoding and the one event loop contend for one
    GIL (ResNet-20, one image per request, 32 clients: one process with the tuned two
    sessions 0.49 of two workers; the default single session 0.74: docs/benchmarks.md),
    for models fast enough that the event loop is the limit (``LOOP_BOUND_IMG_S``).
    Unchanged when any of the layout is given (--workers, --sessions-per-device,
    --intra-op-threads, --shared-inference), off the CPU, or when the served models'
    choices do not all ask for the same such layout."""
    from resnet_serve.service import tuning
    from resnet_serve.service.devices import parse_devices
    from resnet_serve.service.repository import RepositoryError, discover

    layout = {"workers", "sessions_per_device", "intra_op_threads", "shared_inference"}
    if settings.tuning == "off" or layout & settings.model_fields_set:
        return settings
    try:
        if parse_devices(settings.device)[0].kind != "cpu":
            return settings
        choices = [
            tuning.find(spec, settings)[0]
            for spec in discover(settings.repository, settings.models or None)
        ]
    except (RepositoryError, ValueError):
        return settings  # said once the models load, with its own message
    if not choices or any(
        c is None or c.settings.get("intra_op_threads") != 1 or c.img_s < LOOP_BOUND_IMG_S
        for c in choices
    ):
        return settings
    counts = {c.settings.get("sessions_per_device", 1) for c in choices if c is not None}
    n = counts.pop() if len(counts) == 1 else 1
    if n < 2:
        return settings
    log.info(
        "tuned layout: %d worker processes of one session each (the tuning's %d sessions x "
        "1 intra-op thread), one event loop per session", n, n,
    )  # fmt: skip
    # The workers take their one intra-op thread from the same choice (tuning.apply).
    return settings.model_copy(update={"workers": n, "intra_op_threads": 1})


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the supervisor dies, even by SIGKILL, so
    that no orphan keeps serving on the port (Linux's PR_SET_PDEATHSIG)."""
    # Not Linux: no such call; the supervisor's own handlers still stop the workers.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class Supervisor:
    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self.settings = settings
        self.argv = argv
        self.procs: list[subprocess.Popen[bytes]] = []
        self.host: subprocess.Popen[bytes] | None = None  # --shared-inference
        self._host_dir: str | None = None
        self.stopping = False
        self._own_dir: str | None = None
        self._ready_dir = tempfile.mkdtemp(prefix="resnet-serve-ready-")
        self._signalled: set[int] = set()  # workers passed a stop signal

    def _metrics_dir(self) -> str:
        path = os.environ.get(MULTIPROC_ENV)
        if path:  # given by the operator
            clear_files(path)
            return path
        self._own_dir = tempfile.mkdtemp(prefix="resnet-serve-metrics-")
        return self._own_dir

    def _forward(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = True
        for p in self.procs:
            if p.poll() is None:
                self._signalled.add(p.pid)
                p.send_signal(sig)

    def run(self, sock: socket.socket) -> int:
        from prometheus_client.multiprocess import mark_process_dead

        port = sock.getsockname()[1]
        metrics_dir = self._metrics_dir()
        env = {
            **os.environ, **split_threads(self.settings), MULTIPROC_ENV: metrics_dir,
            READY_DIR_ENV: self._ready_dir, COUNT_ENV: str(self.settings.workers),
        }  # fmt: skip
        # The resolved port last: argparse keeps the last occurrence of an option.
        argv = [sys.executable, "-m", "resnet_serve.service.cli", *self.argv, "--port", str(port)]
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        try:
            if self.settings.shared_inference:
                env[INFERENCE_SOCKET_ENV] = self._start_host()
            for i in range(self.settings.workers):
                if self.stopping:  # a signal came while they start: no more of them
                    break
                # A session of their own: a terminal's Ctrl-C reaches the supervisor alone,
                # which passes it on once (twice would be "quit now, skip the drain").
                self.procs.append(
                    subprocess.Popen(
                        argv, env={**env, WORKER_ENV: str(i)}, start_new_session=True,
                        preexec_fn=_die_with_parent,
                    )
                )  # fmt: skip
            log.info(
                "%d workers on port %d (pids %s)",
                len(self.procs), port, ", ".join(str(p.pid) for p in self.procs),
            )  # fmt: skip
            for p in self.procs:  # started as the signal came, after it was passed on
                if self.stopping and p.pid not in self._signalled:
                    p.send_signal(signal.SIGTERM)
            return self._wait()
        finally:
            self._forward(signal.SIGTERM, None)
            for p in self.procs:
                p.wait()
                # Its live gauges (in flight, queued, ready) go; counters stay in the sums.
                mark_process_dead(p.pid, metrics_dir)
            # Last: the workers' drain still ran batches through it.
            self._stop_host()
            sock.close()
            shutil.rmtree(self._ready_dir, ignore_errors=True)
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)

    def _exit_code(self, code: int) -> int:
        """A return code as the service's: 128 + a signal's number (as shells give it), 0
        for the stop signals passed on while stopping."""
        if code >= 0:
            return code
        if self.stopping and -code in (signal.SIGTERM, signal.SIGINT):
            return 0
        return 128 - code

    def _wait(self) -> int:
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                return next((e for c in codes if (e := self._exit_code(c or 0))), 0)
            failed = next((c for c in codes if c is not None), None)
            if not self.stopping and self.host is not None and self.host.poll() is not None:
                failed = self.host.returncode or 1
                codes.append(failed)
                log.error("the inference process exited (code %s)", self.host.returncode)
            if not self.stopping and any(c is not None for c in codes):
                # A process ended unasked (even cleanly): the service is not whole any more.
                log.error("a process exited (code %s): stopping the others", failed)
                code = self._exit_code(failed) if failed else 1
                self._forward(signal.SIGTERM, None)
                for p in self.procs:
                    p.wait()
                return code
            time.sleep(0.1)

    def _start_host(self) -> str:
        """Start the inference process; the path of its socket."""
        self._host_dir = tempfile.mkdtemp(prefix="resnet-serve-inference-")
        path = str(Path(self._host_dir) / "inference.sock")
        # Not the workers' split: its sessions get the cores one process would give them.
        env = {**os.environ, INFERENCE_SOCKET_ENV: path}
        argv = [sys.executable, "-m", "resnet_serve.service.inference_host", *self.argv]
        self.host = subprocess.Popen(
            argv, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        log.info("inference process started (pid %d), socket %s", self.host.pid, path)
        return path

    def _stop_host(self) -> None:
        if self.host is not None:
            if self.host.poll() is None:
                self.host.send_signal(signal.SIGTERM)
            try:
                self.host.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.host.kill()
                self.host.wait()
        if self._host_dir is not None:
            shutil.rmtree(self._host_dir, ignore_errors=True)
