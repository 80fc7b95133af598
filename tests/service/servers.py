"""Real servers for the tests: uvicorn on a free port, in a thread (when the test must
reach inside, e.g. to slow a session down) or as the `resnet-serve` process itself."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image
from starlette.types import ASGIApp

from resnet_serve.service.app import create_app
from resnet_serve.service.connections import ConnectionLimits, guarded_protocol
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.runtime import Runtime
from resnet_serve.service.settings import Settings

# How long a held run waits at most when nobody releases it: far beyond any bound a test
# sets on what it waits for, so that only a test that forgot to release waits this long.
HOLD_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **kwargs)
    return buf.getvalue()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def classify_each(url: str, model: str, blobs: list[bytes]) -> list[list[dict]]:  # type: ignore[type-arg]
    """The service's predictions for each image, all sent in one request."""
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    resp = httpx.post(f"{url}/v1/models/{model}/classify", files=files)
    assert resp.status_code == 200, resp.text
    return [r["predictions"] for r in resp.json()["results"]]


class ThreadServer:
    """``wrap``: what uvicorn serves instead of the app itself, e.g. a proxy in front of it."""

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime | None = None,
        wrap: Callable[[ASGIApp], ASGIApp] | None = None,
        guarded: bool = False,
    ) -> None:
        self.settings = settings
        self.runtime = runtime or Runtime.load(settings, Metrics())
        self.app = create_app(settings, self.runtime)
        self.port = free_port()
        served = wrap(self.app) if wrap is not None else self.app
        # ``guarded``: the connections as resnet-serve's own command serves them (its
        # limits, and each request's disconnect future); otherwise uvicorn's own protocol.
        http: Any = "auto"
        if guarded:
            limits = ConnectionLimits(
                max_header_bytes=settings.max_header_bytes, max_headers=settings.max_headers,
                header_timeout_s=settings.header_timeout_s,
                body_idle_timeout_s=settings.body_idle_timeout_s, max_connections=1000,
            )  # fmt: skip
            http = guarded_protocol(limits, self.runtime.metrics)
        config = uvicorn.Config(
            served, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            http=http,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.gate: Hold | None = None  # busy_server's hold on the sessions

    def start(self, wait_ready: bool = True) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30)
        if wait_ready:
            wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def thread_server(repository: Path, wait_ready: bool = True, **options) -> Iterator[ThreadServer]:  # type: ignore[no-untyped-def]
    server = ThreadServer(Settings(repository=repository, **options))
    server.start(wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.stop()


# A `resnet-serve` process started with ``holdable=True`` imports this first (as its
# sitecustomize): while the hold file exists, every onnxruntime run that starts waits for it
# to be removed (at most HOLD_TIMEOUT_S), having created the entered file first.
_HOLD_HOOK = f"""
import os
import time
from pathlib import Path

from resnet_serve.service import sessions

_hold = Path(os.environ["SERVERS_PY_HOLD_FILE"])
_entered = Path(os.environ["SERVERS_PY_ENTERED_FILE"])
_run = sessions.Worker.run


def _held_run(self, *args, **kwargs):
    if _hold.exists():
        _entered.touch()
        end = time.monotonic() + {HOLD_TIMEOUT_S}
        while _hold.exists() and time.monotonic() < end:
            time.sleep(0.005)
    return _run(self, *args, **kwargs)


sessions.Worker.run = _held_run
"""


class ProcessServer:
    """`resnet-serve` as users run it, configured through the environment. With
    ``holdable=True`` a test can hold its sessions: ``hold()``, ``entered()``, ``release()``."""

    def __init__(self, repository: Path, *, holdable: bool = False, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "RESNET_SERVE_REPOSITORY": str(repository),
            "RESNET_SERVE_PORT": str(self.port),
            "RESNET_SERVE_LOG_LEVEL": "warning",
            **{f"RESNET_SERVE_{k.upper()}": v for k, v in env.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None
        # Run in the child before it starts (resource limits, for instance).
        self.preexec: Callable[[], None] | None = None
        # A file, not a pipe: nobody reads a pipe while the server runs, and a full one
        # would block the server's logging.
        self.log = tempfile.NamedTemporaryFile(prefix="resnet-serve-", suffix=".log")  # noqa: SIM115
        self._hooks: tempfile.TemporaryDirectory[str] | None = None
        if holdable:
            self._hooks = tempfile.TemporaryDirectory(prefix="resnet-serve-hooks-")
            hooks = Path(self._hooks.name)
            (hooks / "sitecustomize.py").write_text(_HOLD_HOOK)
            path = [str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])]
            self.env["PYTHONPATH"] = os.pathsep.join(path)
            self.env["SERVERS_PY_HOLD_FILE"] = str(hooks / "hold")
            self.env["SERVERS_PY_ENTERED_FILE"] = str(hooks / "entered")

    def _hook_file(self, name: str) -> Path:
        assert self._hooks is not None, "only a ProcessServer(..., holdable=True) can be held"
        return Path(self._hooks.name) / name

    def hold(self) -> None:
        """Every onnxruntime run that starts from now on waits until ``release()``."""
        self._hook_file("entered").unlink(missing_ok=True)
        self._hook_file("hold").touch()

    def entered(self) -> bool:
        """Whether a run started, and was held, since ``hold()``."""
        return self._hook_file("entered").exists()

    def release(self) -> None:
        self._hook_file("hold").unlink(missing_ok=True)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def start(self, wait_ready: bool = True) -> ProcessServer:
        """Start and wait until ready, or (``wait_ready=False``) only until it listens."""
        # From a folder of its own, as the installed script runs: the checkout's top-level
        # names (``service``, ``contract``) are not importable there, as they are not for
        # users (``python -m`` puts the working directory on the path).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resnet_serve.service.cli"], env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=self.preexec,
            cwd=tempfile.gettempdir(),
        )  # fmt: skip
        probe = "/readyz" if wait_ready else "/healthz"

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            return httpx.get(self.url + probe).status_code == 200

        wait_until(up, timeout=90)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Hold(threading.Event):
    """Set it to release the held runs. ``entered`` is set as soon as a held run starts, so
    that a test waits for the work to be stuck instead of sleeping and hoping it is."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()


def hold(runtime: Runtime, what: str = "run", timeout: float = HOLD_TIMEOUT_S) -> Hold:
    """Make every session's ``run`` (or every model's ``warmup``) wait until the returned
    event is set (or ``timeout`` passed), so a test can look at the service while work is
    stuck."""
    gate = Hold()

    def held(real):  # type: ignore[no-untyped-def]
        def wrapper(*args):  # type: ignore[no-untyped-def]
            gate.entered.set()
            gate.wait(timeout)
            return real(*args)

        return wrapper

    for model in runtime.models.values():
        if what == "warmup":
            model.pool.warmup = held(model.pool.warmup)  # type: ignore[method-assign]
        else:
            for worker in model.pool.workers:
                worker.run = held(worker.run)  # type: ignore[method-assign]
    return gate


@contextmanager
def busy_server(
    repository: Path, image: bytes, guarded: bool = False, **options
) -> Iterator[tuple[ThreadServer, list[httpx.Response]]]:  # type: ignore[no-untyped-def]
    """A server whose only session is held by one request for ``image``, sent first; it
    is released (and that request answered, into the yielded list) when the block ends,
    or earlier by ``srv.gate.set()``. The block starts once the holder's image is in the
    session, so whatever the test sends then queues behind it."""
    settings = Settings(repository=repository, **options)
    srv = ThreadServer(settings, guarded=guarded)
    srv.start()
    gate = srv.gate = hold(srv.runtime)
    answers: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: answers.append(
            httpx.post(srv.url + "/v1/classify", content=image,
                       headers={"content-type": "image/png"}, timeout=HOLD_TIMEOUT_S + 30)
        )
    )  # fmt: skip
    holder.start()

    def entered() -> bool:
        if not gate.entered.is_set() and not holder.is_alive():
            got = f"{answers[0].status_code} {answers[0].text}" if answers else "no answer"
            raise RuntimeError(f"the holder's request ended before its run started: {got}")
        return gate.entered.is_set()

    try:
        wait_until(entered, timeout=60)
        yield srv, answers
        gate.set()
        holder.join(HOLD_TIMEOUT_S + 30)
    finally:
        gate.set()
        srv.stop()


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux: /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return [int(p) for p in f.read().split()]


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (Linux: /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
