"""Ray Serve peer: one deployment, one replica, ``@serve.batch`` around
``common.Classifier.classify``, behind Ray Serve's own HTTP proxy.

Run: ``PYTHON -m resnet_serve.bench.peers.ray --model-dir DIR --port PORT --workdir DIR``.

This process starts a private local Ray (GCS, raylet, workers, agents: all its
descendants, so resnet-bench's CPU accounting of the process tree sees them), stays in the
foreground while serving and, on SIGTERM, shuts Serve and Ray down and reaps whatever Ray
left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from resnet_serve.bench.peers import (
    INTRA_OP_THREADS_ENV,
    MAX_BATCH_SIZE,
    arguments,
    become_subreaper,
)

RAY_VERSION = "2.60.0"  # as pinned in ray.txt; main() checks it against the installed one
LABEL = f"Ray Serve {RAY_VERSION}"
# A route the replica itself answers, so a 200 means the model is loaded and the proxy
# routes to it, whatever the proxy's own /-/healthz and /-/routes say.
HEALTH_PATH = "/healthz"
CLASSIFY_PATH = "/classify"
# Requests a replica accepts at once. Ray Serve's default (5) would cap every batch at 5,
# so room for one full batch running and the next one filling.
MAX_ONGOING_REQUESTS = 2 * MAX_BATCH_SIZE
DESCRIPTION = (
    f"{LABEL}: one deployment with --workers replicas (num_cpus=1 each) behind Serve's "
    "HTTP proxy on a one-node local Ray; a Starlette-request ingress and "
    f"@serve.batch(max_batch_size={MAX_BATCH_SIZE}, batch_wait_timeout_s=--batch-delay-ms) "
    "whose handler decodes and runs the batch on the loop that runs the replica's user code "
    f"(Ray Serve's documented pattern), max_ongoing_requests={MAX_ONGOING_REQUESTS}; one "
    "onnxruntime session per replica; access logs off."
)

# Controller, proxy and replica alike: a log line per request is work the other servers
# of the benchmark do not do (resnet-serve runs with --log-level warning).
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}

log = logging.getLogger("resnet_serve.bench.peers.ray")

# AF_UNIX paths hold at most 107 bytes and Ray puts its sockets at
# <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store: <temp> plus up to 64.
_MAX_RAY_TEMP_DIR = 40
# SIGTERM to exit: resnet-bench waits 60 s, so everything is killed well before that.
_SHUTDOWN_DEADLINE_S = 40.0


class _Terminated(Exception):
    """SIGTERM or SIGINT before Serve was up."""


def _parents() -> dict[int, int]:
    """pid -> ppid of every live process (zombies are done), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    return parents


def _descendants() -> list[int]:
    """Every live descendant of this process."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [os.getpid()]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _reap() -> None:
    """Collect the exit status of any dead child, orphans handed to us included."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _wait_descendants(timeout_s: float) -> list[int]:
    """Wait until no descendant is left or ``timeout_s`` passes; those left."""
    end = time.monotonic() + timeout_s
    while True:
        _reap()
        left = _descendants()
        if not left or time.monotonic() >= end:
            return left
        time.sleep(0.1)


def _kill_descendants() -> list[int]:
    """SIGKILL every descendant, until none is left; return those killed."""
    killed: list[int] = []
    for _ in range(10):  # a dying parent may still hand over children
        left = _wait_descendants(0.0)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += left
        _wait_descendants(1.0)
    return killed


def _auth_token(workdir: Path) -> Path:
    """A fresh random token for Ray's RPCs, readable by this user only."""
    path = workdir / "ray_auth_token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _ray_temp_dir(workdir: Path) -> tuple[str, Path | None]:
    """Ray's temp dir under ``workdir``; through a short symlink in /tmp when ``workdir``
    is too deep for Ray's socket paths (the files still land in ``workdir``)."""
    target = (workdir / "ray").resolve()
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target).encode()) <= _MAX_RAY_TEMP_DIR:
        return str(target), None
    link = Path(tempfile.mkdtemp(prefix="raypeer-", dir="/tmp")) / "r"
    link.symlink_to(target, target_is_directory=True)
    return str(link), link


def _loopback_replica_grpc() -> None:
    """Make this replica's inter-deployment gRPC server (Serve binds it to ``[::]:0``,
    with no setting to change that) listen on 127.0.0.1, the node's address. Called in
    the replica's ``__init__``, which Serve runs before it starts that server."""
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:  # another Serve: nothing to patch, the listener check will say
        return

    def loopback(server: Any, address: str) -> int:
        return int(bind(server, address.replace("[::]", "127.0.0.1")))

    replica.add_port_to_grpc_server = loopback


def _deployment(model_dir: Path, replicas: int, batch_wait_s: float) -> Any:
    """The Serve application: imports Ray inside, so the module imports without it."""
    from ray import serve
    from starlette.datastructures import UploadFile
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from resnet_serve.bench.peers.common import Classifier

    @serve.deployment(
        num_replicas=replicas,
        # One of the node's CPUs each, so that replicas schedule beside the proxy and
        # controller (num_cpus=0 each); their onnxruntime threads: INTRA_OP_THREADS_ENV.
        ray_actor_options={"num_cpus": 1},
        max_ongoing_requests=MAX_ONGOING_REQUESTS,
    )
    class ResNet:
        def __init__(self, model_dir: str, intra_op_threads: str | None) -> None:
            _loopback_replica_grpc()
            # Passed along: a replica's process is Ray's, started by the raylet.
            if intra_op_threads is not None:
                os.environ[INTRA_OP_THREADS_ENV] = intra_op_threads
            self.classifier = Classifier(Path(model_dir))

        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=batch_wait_s)
        async def classify(self, images: list[bytes]) -> list[dict[str, Any]]:
            # On the event loop, as Ray Serve's batching guide calls its model. Requests
            # that arrive meanwhile wait in Ray's core worker and form the next batch
            # when this returns. Offloaded to a thread (asyncio.to_thread), the loop
            # would be free but serve.batch would then seal the next batch 2 ms after
            # its first request and hold it until this one ends: smaller batches.
            return self.classifier.classify(images)

        async def __call__(self, request: Request) -> JSONResponse:
            path, method = request.url.path, request.method
            if path == HEALTH_PATH and method == "GET":
                # Only reachable once __init__ (the model load) has returned.
                return JSONResponse({"status": "ok"})
            if path == CLASSIFY_PATH and method == "POST":
                form = await request.form()
                part = form.get("file")
                if not isinstance(part, UploadFile):
                    return JSONResponse({"detail": "one multipart part 'file'"}, 422)
                data = await part.read()
                await form.close()
                return JSONResponse(await self.classify(data))
            return JSONResponse({"detail": "Not Found"}, 404)

    return ResNet.bind(str(model_dir), os.environ.get(INTRA_OP_THREADS_ENV))


def main() -> None:
    args = arguments("resnet_serve.bench.peers.ray")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not become_subreaper():  # Ray's orphans (a worker whose raylet is gone) stay ours
        log.warning("could not become the subreaper of Ray's processes")
    # Read when Ray is imported. No usage report to anywhere. And a node of one machine,
    # as on Windows and macOS: without this, ray.init turns _node_ip_address 127.0.0.1 into
    # the machine's outward address and Ray's servers bind to it or to every address.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray's default token authentication, with a token of this run's own: otherwise
    # ray.init writes one to ~/.ray/auth_token, outside the workdir, and keeps it.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_auth_token(workdir))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file

    import ray
    from ray import serve

    if ray.__version__ != RAY_VERSION:
        log.warning("Ray %s installed, LABEL says %s", ray.__version__, RAY_VERSION)

    stop = threading.Event()
    starting = True

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Installed once ray.init has returned: a signal before that meets Ray's own
        # handler, which kills Ray's processes and exits (through the finally below).
        first = not stop.is_set()
        stop.set()
        log.info("signal %d: shutting down", signum)
        if first and starting:  # out of serve.start/serve.run, which may wait long
            raise _Terminated

    started = time.monotonic()
    temp_dir, link = _ray_temp_dir(workdir)
    try:
        _serve(ray, serve, args, temp_dir, on_signal)
        log.info(
            "Ray Serve %s on 127.0.0.1:%d after %.1f s (Ray temp dir %s)",
            ray.__version__, args.port, time.monotonic() - started, temp_dir,
        )  # fmt: skip
        starting = False
        while not stop.wait(1.0):
            pass
    except _Terminated:
        pass
    finally:
        starting = False  # a second signal must not break off the shutdown
        _shutdown(serve, ray, link)


def _serve(
    ray: ModuleType,
    serve: ModuleType,
    args: argparse.Namespace,
    temp_dir: str,
    on_signal: Callable[[int, FrameType | None], None],
) -> None:
    """Ray, then Serve and the application; returns once the replica is up."""
    ray.init(
        address="local",  # never join a cluster RAY_ADDRESS or /tmp/ray may point at
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=temp_dir,
        # Requests are a few hundred KB at most and mostly travel inline: no need for
        # Ray's default of 30% of RAM in /dev/shm.
        object_store_memory=256 * 1024**2,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    # After ray.init, which installs a SIGTERM handler of its own (kill and exit).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": "127.0.0.1", "port": args.port},
        logging_config=SERVE_LOGGING,
    )
    # Returns once the replica is up (its __init__ done).
    app = _deployment(args.model_dir.resolve(), args.workers, args.batch_delay_ms / 1000)
    serve.run(app, name="resnet", route_prefix="/", logging_config=SERVE_LOGGING)


def _shutdown(serve: ModuleType, ray: ModuleType, link: Path | None) -> None:
    """Serve, then Ray, then anything of Ray's still alive; bounded in time."""

    def watchdog() -> None:
        # Serve's graceful shutdown can hang on a stuck replica: SIGTERM is an order.
        time.sleep(_SHUTDOWN_DEADLINE_S)
        left = _kill_descendants()
        log.warning("shutdown past %g s: killed %s", _SHUTDOWN_DEADLINE_S, left)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    started = time.monotonic()
    # Not without Ray: serve.shutdown would start a Ray to look for Serve in.
    steps = (("serve.shutdown", serve.shutdown),) if ray.is_initialized() else ()
    for name, step in (*steps, ("ray.shutdown", ray.shutdown)):
        try:
            step()
        except Exception:
            log.exception(name)
        log.info("%s done after %.1f s", name, time.monotonic() - started)
    # Ray's workers exit on their own once the raylet is gone; give them a moment.
    _wait_descendants(5.0)
    left = _kill_descendants()
    if left:
        log.warning("killed processes Ray left behind: %s", left)
    if link is not None:
        link.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            link.parent.rmdir()
    log.info("stopped in %.1f s", time.monotonic() - started)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
