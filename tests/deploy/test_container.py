"""The runtime-cpu image, built and run by a real Docker engine: the image is the thing
under test.

tools/docker_engine.sh starts a private dockerd once for this module (no bridge, no
iptables; stopped by its PID afterwards if this module started it) and imports the
STAND-IN base (Debian bookworm's Python 3.11, not Docker Hub's python:3.12 image, which
is unreachable here). The build is air-gapped as an operator's would be: `--network none`,
the wheelhouse of tools/wheelhouse.sh as the `wheels` context, the shared CIFAR checkpoints
as the `weights` context, the base by build arg. Containers run with `--network host`
bound to 127.0.0.1, `--read-only`.

Under CI=true an engine that cannot be set up fails the module; elsewhere, without root,
it is skipped with the reason.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, SHARED, WEIGHTS_HOME, cached, run_setup_step
from tests.deploy.conftest import COMPOSE_FILE

ENGINE = ROOT / "tools" / "docker_engine.sh"
WHEELHOUSE = ROOT / "tools" / "wheelhouse.sh"
COMPOSE_HOST = Path(__file__).parent / "compose.host-network.yml"
MODEL = "resnet20_cifar10"
TAG = "resnet-serve:test-cpu"
READY_TIMEOUT_S = 120
BATCH = 32  # images per request: under --max-images-per-request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Engine:
    env: dict[str, str]

    @property
    def stand_in(self) -> str:
        return self.env["STAND_IN"]

    def docker(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=ROOT)  # fmt: skip
        if check and proc.returncode != 0:
            pytest.fail(f"docker {shlex.join(args)} exited {proc.returncode}:\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")  # fmt: skip
        return proc


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("the Docker engine needs root (tools/docker_engine.sh); CI runs as root")
    try:
        proc = subprocess.run([str(ENGINE), "start"], capture_output=True, text=True,
                              timeout=1200, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"tools/docker_engine.sh start: no engine in {exc.timeout:.0f}s")
    started = "started" in proc.stdout.split()
    try:
        if proc.returncode != 0:
            pytest.fail(f"tools/docker_engine.sh start exited {proc.returncode}:\n{proc.stderr}")
        lines = subprocess.run([str(ENGINE), "env"], capture_output=True, text=True,
                               check=True).stdout.splitlines()  # fmt: skip
        env = {**os.environ, **dict(line.split("=", 1) for line in lines)}
        yield Engine(env)
    finally:
        if started:
            subprocess.run([str(ENGINE), "stop"], timeout=120, check=False)


def _build_wheelhouse(tmp: Path) -> None:
    # pip's own sources of this machine (TORCH_INDEX_URL empty): its CPU torch wheel.
    run_setup_step([str(WHEELHOUSE), str(tmp), "cpu"], "tools/wheelhouse.sh",
                   env={**os.environ, "TORCH_INDEX_URL": ""})  # fmt: skip


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    """The wheelhouse for this machine's Python (the stand-in's too: 3.11), once per
    pyproject.toml and Dockerfile pins."""
    key = hashlib.sha256()
    for name in ("pyproject.toml", "Dockerfile", "tools/wheelhouse.sh"):
        key.update((ROOT / name).read_bytes())
    return cached(f"wheelhouse-{key.hexdigest()[:16]}", _build_wheelhouse)


def _build_args(engine: Engine, wheels: Path, target: str, tag: str) -> list[str]:
    return ["build", "--network", "none", "--target", target, "-t", tag,
            "--build-arg", f"PYTHON_IMAGE={engine.stand_in}", "--build-arg", f"MODELS={MODEL}",
            "--build-context", f"wheels={wheels}", "--build-context", f"weights={WEIGHTS_HOME}",
            "."]  # fmt: skip


@pytest.fixture(scope="module")
def image(engine: Engine, wheelhouse: Path) -> str:
    engine.docker(*_build_args(engine, wheelhouse, "runtime-cpu", TAG), timeout=1500)
    return TAG


@dataclass
class Container:
    cid: str
    url: str
    engine: Engine

    def logs(self) -> str:
        proc = self.engine.docker("logs", self.cid, check=False)
        return proc.stdout + proc.stderr

    def inspect(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.engine.docker("inspect", self.cid).stdout)[0]


def wait_ready(url: str, alive: Callable[[], bool], logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert alive(), f"the container exited:\n{logs()}"
        assert time.monotonic() < deadline, f"not ready in {READY_TIMEOUT_S}s:\n{logs()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def container(engine: Engine, image: str) -> Iterator[Container]:
    port = _free_port()
    cid = engine.docker(
        "run", "-d", "--read-only", "--network", "host", "--stop-timeout", "60",
        "-e", "RESNET_SERVE_HOST=127.0.0.1", "-e", f"RESNET_SERVE_PORT={port}", image,
    ).stdout.strip()  # fmt: skip
    c = Container(cid, f"http://127.0.0.1:{port}", engine)
    try:
        wait_ready(c.url, lambda: c.inspect()["State"]["Running"], c.logs)
        yield c
    finally:
        engine.docker("rm", "-f", cid, check=False)


def test_non_root_read_only_no_torch(container: Container) -> None:
    info = container.inspect()
    assert info["Config"]["User"] == "10001:10001"
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    probe = (
        "import os, importlib.util as u, json; print(json.dumps({'uid': os.getuid(), "
        "'gid': os.getgid(), 'torch': u.find_spec('torch') is not None, "
        "'ort': u.find_spec('onnxruntime') is not None}))"
    )
    out = container.engine.docker("exec", container.cid, "python", "-c", probe).stdout
    assert json.loads(out) == {"uid": 10001, "gid": 10001, "torch": False, "ort": True}
    # Trimmed: no pip in the runtime venv, and the root file system refuses writes.
    venv = container.engine.docker("exec", container.cid, "ls", "/opt/resnet-serve/bin").stdout
    assert "pip" not in venv.split()
    touch = container.engine.docker("exec", container.cid, "touch", "/opt/x", check=False)
    assert touch.returncode != 0


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def documented_accuracy(model: str = "ResNet-20") -> float:
    """The accuracy ../shared/README.md gives for the reference checkpoint on its 846 test
    images: the figure to meet, not one this test chose."""
    text = (SHARED / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"{re.escape(model)} (0\.\d+)", text)
    assert m, f"no accuracy for {model} in {SHARED / 'README.md'}"
    return float(m.group(1))


def test_cifar_accuracy_through_the_container(
    container: Container, cifar_test: dict[str, np.ndarray]
) -> None:
    images, labels = cifar_test["images"], cifar_test["labels"]
    classes = [str(c) for c in cifar_test["classes"]]
    correct = 0
    with httpx.Client(base_url=container.url, timeout=120) as client:
        for start in range(0, len(images), BATCH):
            chunk = range(start, min(start + BATCH, len(images)))
            files = [("file", (f"{i}.png", _png(images[i]), "image/png")) for i in chunk]
            r = client.post(f"/v1/models/{MODEL}/classify", files=files)
            assert r.status_code == 200, r.text
            top1 = [res["predictions"][0]["label"] for res in r.json()["results"]]
            correct += sum(t == classes[int(labels[i])] for t, i in zip(top1, chunk, strict=True))
    accuracy = correct / len(images)
    # ONNX Runtime against the PyTorch reference: a disagreement on one or two of the 846
    # images (float rounding at a near tie) is the most this allows.
    assert abs(accuracy - documented_accuracy()) <= 2.5 / len(images), accuracy


def test_healthcheck_reports_healthy(container: Container) -> None:
    # The image's own HEALTHCHECK (every 10 s): docker runs it inside the container.
    deadline = time.monotonic() + 60
    while (health := container.inspect()["State"]["Health"])["Status"] != "healthy":
        assert health["Status"] == "starting", health
        assert time.monotonic() < deadline, health
        time.sleep(1)
    assert health["Log"] and health["Log"][-1]["ExitCode"] == 0, health


def _compose(engine: Engine, project: str, port: int, *args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    env = {**engine.env, "RESNET_SERVE_TEST_IMAGE": TAG, "RESNET_SERVE_TEST_PORT": str(port)}
    argv = ["docker", "compose", "-p", project, "-f", str(COMPOSE_FILE), "-f", str(COMPOSE_HOST),
            "--profile", "cpu", *args]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)  # fmt: skip


def test_compose_cpu_profile_comes_up_healthy(engine: Engine, image: str) -> None:
    """The compose file's resnet-serve-cpu service alone, from the built image (Prometheus
    and Grafana images cannot be pulled here), host network on 127.0.0.1."""
    project, port = f"resnet-serve-test-{os.getpid()}", _free_port()
    try:
        up = _compose(engine, project, port, "up", "-d", "--no-build", "--pull", "never",
                      "--wait", "--wait-timeout", "120", "resnet-serve-cpu")  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert r.status_code == 200 and r.json()["models"] == {MODEL: True}, r.text
        ps = _compose(engine, project, port, "ps", "--format", "json")
        rows = [json.loads(line) for line in ps.stdout.splitlines() if line.strip()]
        assert [(row["Service"], row["Health"]) for row in rows] == [
            ("resnet-serve-cpu", "healthy")
        ], ps.stdout
    finally:
        down = _compose(engine, project, port, "down", "-v", "--timeout", "60")
        assert down.returncode == 0, down.stdout + down.stderr


def test_export_stage_alone_with_exactly_its_extras(engine: Engine, wheelhouse: Path) -> None:
    """The export stage is also runtime-gpu's (the stages of it that need no CUDA base):
    built as a target of its own, its `resnet-export` RUN ran with only what the stage
    installs, the wheelhouse holding nothing else it could find (its parity check needs
    onnxruntime: the `cpu` extra)."""
    tag = "resnet-serve:test-export"
    engine.docker(*_build_args(engine, wheelhouse, "export", tag), timeout=1500)
    ls = engine.docker("run", "--rm", "--network", "none", tag, "ls", f"/models/{MODEL}").stdout
    assert {"model.onnx", "model.json"} <= set(ls.split())


def _in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^resnet_serve_requests_in_flight (\S+)$", text, re.M)
    assert m, "resnet_serve_requests_in_flight is not exported"
    return float(m.group(1))


def test_sigterm_drains_requests_in_flight(container: Container) -> None:
    """SIGTERM, the image's STOPSIGNAL, with 40 requests inside the server: each has sent
    its headers and half its body, and sends the rest only once the server has the signal.
    Every one is answered 200, and the container exits 0. Runs last (it stops the
    module's container)."""
    body = _png(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    n, release = 40, threading.Event()

    def upload() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        assert release.wait(120), "never released"
        yield body[len(body) // 2 :]

    def post() -> int:
        headers = {"content-type": "image/png", "content-length": str(len(body))}
        r = httpx.post(f"{container.url}/v1/classify", content=upload(), headers=headers,
                       timeout=120)  # fmt: skip
        return r.status_code

    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(post) for _ in range(n)]
        try:
            # All n inside the server (the in-flight gauge, less the scrape that reads it).
            deadline = time.monotonic() + 60
            while _in_flight(container.url) - 1 < n:
                assert time.monotonic() < deadline, f"{_in_flight(container.url)} in flight"
                time.sleep(0.05)
            container.engine.docker("kill", "--signal", "SIGTERM", container.cid)
            # uvicorn says so when it has the signal (and stops accepting).
            deadline = time.monotonic() + 60
            while "Shutting down" not in container.logs():
                assert time.monotonic() < deadline, container.logs()
                time.sleep(0.05)
        finally:
            release.set()
        codes = [f.result() for f in futures]
    assert codes == [200] * n, codes
    container.engine.docker("wait", container.cid, timeout=120)
    state = container.inspect()["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, container.logs())
    assert "Traceback" not in container.logs()
