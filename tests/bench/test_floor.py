"""The floor peer (bench/peers/floor.py), for real: it needs only what resnet-serve runs on,
so unlike the frameworks it is started here as ``resnet-bench --peer floor=PYTHON`` runs
it, answers as the service does, batches, shares its port between workers and stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from resnet_serve.bench import peers
from resnet_serve.bench.cli import main
from resnet_serve.bench.corpus import from_path
from resnet_serve.bench.peers import floor
from resnet_serve.bench.peers.common import Classifier
from tests.service.servers import png

MODEL = "resnet20_cifar10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def post(client: httpx.Client, url: str, blob: bytes) -> httpx.Response:
    return client.post(url, files={"file": ("image.png", blob, "image/png")}, timeout=30)


def test_two_workers_answer_as_the_classifier_batch_and_stop(
    cifar_repository: Path, cifar_test: dict[str, np.ndarray], tmp_path: Path
) -> None:
    port = free_port()
    model_dir = cifar_repository / MODEL
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_serve.bench.peers.floor", "--model-dir", str(model_dir),
         "--port", str(port), "--workdir", str(tmp_path / "work"), "--workers", "2"],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client() as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get(base + floor.HEALTH_PATH).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
            # Healthy only once both processes listen on the one port, loopback only.
            servers = children(proc.pid)
            assert len(servers) == 2
            ss = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
            mine = [ln for ln in ss.splitlines() if f":{port} " in ln]
            assert len(mine) == 2 and all(f"127.0.0.1:{port} " in ln for ln in mine)
            blobs = [png(img) for img in cifar_test["images"][:24]]
            url = base + floor.CLASSIFY_PATH
            # From 12 threads at once: batches of more than one image form.
            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(lambda b: post(client, url, b), blobs))
            expected = Classifier(model_dir).classify(blobs)
            for got, want in zip(answers, expected, strict=True):
                assert got.status_code == 200
                (result,) = got.json()["results"]
                (ours,) = want["results"]
                assert [p["index"] for p in result["predictions"]] == [
                    p["index"] for p in ours["predictions"]
                ]
                assert [p["score"] for p in result["predictions"]] == pytest.approx(
                    [p["score"] for p in ours["predictions"]], abs=1e-6
                )
            # The image itself as the body (resnet-bench --body raw): the same answer.
            for blob, want in zip(blobs[:3], expected, strict=False):
                for kind in ("image/png", "application/octet-stream"):
                    got = client.post(url, content=blob, headers={"content-type": kind})
                    assert got.status_code == 200
                    (result,) = got.json()["results"]
                    (ours,) = want["results"]
                    assert [p["index"] for p in result["predictions"]] == [
                        p["index"] for p in ours["predictions"]
                    ]
            # Not a server to deploy, but it answers a broken upload rather than hanging.
            assert post(client, url, b"not an image").status_code == 500
            assert client.post(url, content=b"x").status_code == 400
            assert client.get(base + "/elsewhere").status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not [p for p in servers if os.path.exists(f"/proc/{p}")]


def test_resnet_bench_sweeps_the_floor_and_reports_it(
    cifar_repository: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = main([
        "--start-server", "--repository", str(cifar_repository), "--model", MODEL,
        "--concurrency", "4", "--requests", "40", "--warmup", "0.2", "--no-offline",
        "--corpus-size", "8", "--corpus-dir", str(tmp_path / "corpus"),
        "--peer", f"floor={sys.executable}", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    (step,) = [s for s in doc["steps"] if s["system"] == "floor"]
    # Every answer a 200, and the one checked held the service's classification shape.
    assert step["ok"] == 40 and step["errors"] == {}
    assert step["server_cpu_s"] > 0
    text = (out / "results.md").read_text()
    assert f"| {peers.peer('floor').label} | 4 |" in text
    assert "service peak / floor peak (img/s)" in {r["name"] for r in doc["ratios"]}


def test_resnet_bench_sends_raw_bodies_to_the_service_and_the_floor(
    cifar_repository: Path, cifar_test: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """``--body raw``: each image is the whole body. The service is limited to the largest
    image's size, so a multipart form around it (some 150 bytes more) would be refused
    with 413 and counted as errors."""
    pytest.importorskip("matplotlib")
    np.savez(tmp_path / "eight.npz", images=cifar_test["images"][:8])
    largest = max(len(b) for b in from_path(tmp_path / "eight.npz"))
    out = tmp_path / "out"
    rc = main([
        "--start-server", "--repository", str(cifar_repository), "--model", MODEL,
        "--server-arg", f"--max-body-bytes {largest}", "--body", "raw",
        "--concurrency", "4", "--requests", "24", "--warmup", "0.2", "--no-offline",
        "--images", str(tmp_path / "eight.npz"),
        "--peer", f"floor={sys.executable}", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["body"] == "raw"
    for system in ("service", "floor"):
        (step,) = [s for s in doc["steps"] if s["system"] == system]
        assert step["ok"] == 24 and step["errors"] == {}, system
    assert "1 image(s) per request as the raw body" in (out / "results.md").read_text()


def test_raw_bodies_only_where_they_are_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--url", "http://127.0.0.1:9", "--model", MODEL, "--body", "raw"]
    assert main([*base, "--images-per-request", "2"]) == 2
    assert "--body raw carries one image per request" in capsys.readouterr().err
    assert main([*base, "--repository", str(tmp_path), "--baseline-ort"]) == 2
    assert "the FastAPI baselines take multipart forms only" in capsys.readouterr().err
    assert main([*base, "--repository", str(tmp_path), "--peer", f"ray={sys.executable}"]) == 2
    assert "the ray peer takes multipart forms only" in capsys.readouterr().err
    assert peers.peer("floor").raw_body and not peers.peer("torchserve").raw_body
