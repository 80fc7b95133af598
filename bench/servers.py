"""The systems under test as subprocesses: ``resnet-serve`` itself, and the naive
baseline under uvicorn. Each on a free local port, logging to a file, stopped by SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """A server that would not start; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


@dataclass
class ServerProcess:
    system: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, path: str, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.system} exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            if http_status(self.url + path, timeout=2.0) == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"{self.system} not ready after {timeout_s:g}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _spawn(
    system: str, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # A file, not a pipe: nobody reads the server's output while the load runs, and a
    # full pipe would stall the server mid-benchmark.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    return ServerProcess(system, f"http://127.0.0.1:{port}", proc, log_path)


def resnet_serve_command() -> list[str]:
    """The installed ``resnet-serve`` script beside this interpreter (what users run),
    or the module when the package is not installed as scripts."""
    script = shutil.which("resnet-serve", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "resnet_serve.service.cli"]


def start_service(
    repository: Path,
    model: str,
    server_args: list[str],
    log_path: Path,
    ready_timeout_s: float = 600.0,
) -> ServerProcess:
    port = free_port()
    argv = [
        *resnet_serve_command(),
        "--repository", str(repository),
        "--models", model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--log-level", "warning",
        # HTTP is what is measured: no gRPC port to collide with a server already running
        # (server_args may turn it on again).
        "--grpc-port", "0",
        *server_args,
    ]  # fmt: skip
    server = _spawn("service", argv, port, log_path)
    server.wait_ready("/readyz", ready_timeout_s)
    return server


def _uvicorn_factory(
    system: str, factory: str, env: dict[str, str], log_path: Path, ready_timeout_s: float
) -> ServerProcess:
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", factory, "--factory",
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    server = _spawn(system, argv, port, log_path, env)
    server.wait_ready("/healthz", ready_timeout_s)
    return server


def start_ort_baseline(
    model_dir: Path, log_path: Path, ready_timeout_s: float = 300.0
) -> ServerProcess:
    """FastAPI + onnxruntime (bench/baseline_ort.py) on the model's own model.onnx."""
    env = {"BASELINE_MODEL_DIR": str(model_dir)}
    return _uvicorn_factory(
        "ort", "resnet_serve.bench.baseline_ort:app_from_env", env, log_path, ready_timeout_s
    )


def start_naive(
    model_dir: Path, weights: str | None, log_path: Path, ready_timeout_s: float = 300.0
) -> ServerProcess:
    env = {"NAIVE_MODEL_DIR": str(model_dir)}
    if weights:
        env["NAIVE_WEIGHTS"] = weights
    return _uvicorn_factory(
        "naive", "resnet_serve.bench.naive_server:app_from_env", env, log_path, ready_timeout_s
    )


def start_peer(
    name: str,
    python: str,
    model_dir: Path,
    workdir: Path,
    peer_args: list[str] | None = None,
    ready_timeout_s: float = 600.0,
) -> ServerProcess:
    """A serving framework of bench/peers/ (``peers.NAMES``), started by ``python`` (its own
    environment's interpreter) with its scratch files and log in ``workdir``, serving the
    model under the name of its folder; ``peer_args``: ``peers.arguments``' options."""
    from resnet_serve.bench import peers

    peer = peers.peer(name)
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        python, "-m", f"resnet_serve.bench.peers.{name}",
        "--model-dir", str(model_dir.resolve()), "--port", str(port),
        "--workdir", str(workdir.resolve()), *(peer_args or []),
    ]  # fmt: skip
    # As if its environment were activated: frameworks start helper processes by the
    # `python` they find on PATH (Triton's Python-backend stub, TorchServe's workers), and
    # this process's own environment must not be the one they find.
    bindir = Path(python).absolute().parent
    env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(bindir.parent),
    }
    server = _spawn(name, argv, port, workdir / "server.log", env)
    server.wait_ready(peer.health_path.format(model=model_dir.name), ready_timeout_s)
    return server
