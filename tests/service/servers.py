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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

from service.app import create_app
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings


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


class ThreadServer:
    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or Runtime.load(settings, Metrics())
        self.app = create_app(settings, self.runtime)
        self.port = free_port()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

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


class ProcessServer:
    """`resnet-serve` as users run it, configured through the environment."""

    def __init__(self, repository: Path, **env: str) -> None:
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
        # A file, not a pipe: nobody reads a pipe while the server runs, and a full one
        # would block the server's logging.
        self.log = tempfile.NamedTemporaryFile(prefix="resnet-serve-", suffix=".log")  # noqa: SIM115

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def start(self, wait_ready: bool = True) -> ProcessServer:
        """Start and wait until ready, or (``wait_ready=False``) only until it listens."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli"], env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT,
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


def hold(runtime: Runtime, what: str = "run") -> threading.Event:
    """Make every session's ``run`` (or every model's ``warmup``) wait until the returned
    event is set, so a test can look at the service while work is stuck."""
    gate = threading.Event()

    def held(real):  # type: ignore[no-untyped-def]
        def wrapper(*args):  # type: ignore[no-untyped-def]
            gate.wait(30)
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
    repository: Path, image: bytes, **options
) -> Iterator[tuple[ThreadServer, list[httpx.Response]]]:  # type: ignore[no-untyped-def]
    """A server whose only session is held by one request for ``image``, sent first; it
    is released (and that request answered, into the yielded list) when the block ends."""
    settings = Settings(repository=repository, **options)
    srv = ThreadServer(settings)
    srv.start()
    gate = hold(srv.runtime)
    answers: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: answers.append(
            httpx.post(srv.url + "/v1/classify", content=image,
                       headers={"content-type": "image/png"}, timeout=30)
        )
    )  # fmt: skip
    holder.start()
    time.sleep(0.1)  # the holder's image is in the session before anything else is sent
    try:
        yield srv, answers
        gate.set()
        holder.join(30)
    finally:
        gate.set()
        srv.stop()
