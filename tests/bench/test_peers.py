"""``resnet-bench --peer``: the peers' modules are readable without their frameworks, pin
their environments, answer as the service does, and are started, swept, reported and
stopped by resnet-bench (a stand-in interpreter serves the contract here: CI installs no
framework; tools/peer_env.sh makes the real environments, docs/benchmarks.md has figures)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.bench import load, peers
from resnet_serve.bench.cli import main
from resnet_serve.bench.peers.common import Classifier
from tests.service.servers import classify_each, png, thread_server

PEERS_DIR = Path(peers.__file__).parent
FRAMEWORKS = ("ts", "ray", "bentoml", "pytriton", "tritonclient", "torch")


def test_every_peer_reads_without_its_framework() -> None:
    # The frameworks are made unimportable, so the check holds where one is installed too.
    code = (
        "import sys\n"
        f"for m in {FRAMEWORKS!r}: sys.modules[m] = None\n"
        "import json\n"
        "from resnet_serve.bench import peers\n"
        "print(json.dumps(sorted(p.name for p in map(peers.peer, peers.NAMES))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == sorted(peers.NAMES)
    for name in peers.NAMES:
        p = peers.peer(name)
        assert p.health_path.startswith("/") and p.classify_path.startswith("/")
        assert p.label and re.search(r"\d", p.label), "the label names the version measured"
        assert len(p.description) > 40


def test_every_peer_pins_its_environment() -> None:
    for name in peers.NAMES:
        lines = (PEERS_DIR / f"{name}.txt").read_text().splitlines()
        reqs = [ln.split("#")[0].strip() for ln in lines]
        reqs = [r for r in reqs if r]
        assert reqs and all("==" in r for r in reqs), (name, reqs)
        # The engine is the same on every side of a comparison.
        assert any(r.startswith("onnxruntime==") for r in reqs), name


def test_the_peers_classifier_answers_as_the_service(
    cifar_repository: Path, cifar_test: dict[str, np.ndarray]
) -> None:
    blobs = [png(img) for img in cifar_test["images"][:16]]
    with thread_server(cifar_repository, models="resnet20_cifar10") as srv:
        served = classify_each(srv.url, "resnet20_cifar10", blobs)
    classifier = Classifier(cifar_repository / "resnet20_cifar10")
    # One batched run for all, as a peer's batch handler calls it.
    ours = classifier.classify(blobs)
    assert [a["model"] for a in ours] == ["resnet20_cifar10"] * len(blobs)
    for mine, theirs in zip(ours, served, strict=True):
        (result,) = mine["results"]
        assert [p["index"] for p in result["predictions"]] == [p["index"] for p in theirs]
        assert [p["score"] for p in result["predictions"]] == pytest.approx(
            [p["score"] for p in theirs], abs=1e-5
        )


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    script = tmp_path / "python"
    fake = Path(__file__).with_name("fake_peer.py")
    root = Path(__file__).parents[2]
    script.write_text(
        f'#!/bin/sh\ncd {root}\nexec {sys.executable} {fake} "$@"\n', encoding="utf-8"
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    ("name", "peer_args"),
    [("ray", []), ("triton", ["--peer-arg=--workers 2", "--peer-arg=--batch-delay-ms 1.5"])],
)  # a multipart peer with the defaults, a V2 one with options
def test_a_peer_is_started_swept_reported_and_stopped(
    name: str, peer_args: list[str], cifar_repository: Path, fake_python: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = main([
        "--start-server", "--repository", str(cifar_repository), "--model", "resnet20_cifar10",
        "--concurrency", "1,2", "--requests", "6", "--warmup", "0.2", "--no-offline",
        "--corpus-size", "8", "--corpus-dir", str(tmp_path / "corpus"),
        "--peer", f"{name}={fake_python}", "--rounds", "2", "--out", str(out), "--no-progress",
        *peer_args,
    ])  # fmt: skip
    assert rc == 0
    started = json.loads((out / name / "argv.json").read_text())
    argv = started["argv"]
    assert argv[:2] == ["-m", f"resnet_serve.bench.peers.{name}"]
    assert argv[argv.index("--model-dir") + 1] == str(cifar_repository / "resnet20_cifar10")
    # Its own environment first on PATH, as if activated.
    assert started["PATH"].split(os.pathsep)[0] == str(fake_python.parent)
    if peer_args:  # two workers split the cores' onnxruntime threads
        assert (started["workers"], started["batch_delay_ms"]) == (2, 1.5)
        cores = len(os.sched_getaffinity(0))
        assert started["intra_op_threads"] == str(max(1, cores // 2))
    else:  # one worker, greedy batching, onnxruntime's own thread count
        assert (started["workers"], started["batch_delay_ms"]) == (1, 0.0)
        assert started["intra_op_threads"] is None
    doc = json.loads((out / "results.json").read_text())
    mine = [s for s in doc["steps"] if s["system"] == name]
    assert sorted((s["concurrency"], s["round"]) for s in mine) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # Every answer was a 200; one per step was parsed and held a classification.
    assert all(s["ok"] == 6 and s["errors"] == {} for s in mine)
    # The stand-in's CPU is read from its process tree, as a framework's would be.
    assert all(s["server_cpu_s"] is not None for s in mine)
    text = (out / "results.md").read_text()
    label = peers.peer(name).label
    assert f"| {label} (round 1) | 1 |" in text
    header = text.split("## HTTP load")[0]
    assert peers.peer(name).description in header
    assert ("--workers 2 --batch-delay-ms 1.5" if peer_args else "defaults: --workers 1") in header
    # What each server took while idle, all up at once, before the first round.
    assert set(doc["meta"]["idle_cpu"]) == {"resnet-serve", label}
    assert all(0 <= v < 2.5 for v in doc["meta"]["idle_cpu"].values())
    (idle,) = [ln for ln in text.splitlines() if "while all were up and none loaded" in ln]
    assert f"{label} " in idle and "resnet-serve " in idle
    names = {r["name"] for r in doc["ratios"]}
    assert {f"service peak / {name} peak (img/s)", f"service@2 / {name}@2 (img/s), paired rounds",
            f"{name} 1-client p50 / service 1-client p50 (ms), paired rounds"} <= names  # fmt: skip
    # Stopped: nothing of it is left running.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(fake_python) not in ps and "fake_peer.py" not in ps


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peer", "ray"], "expected NAME=PYTHON"),
        (["--peer", "nginx=/bin/sh"], "expected NAME=PYTHON"),
        (["--peer", "ray=/nonexistent/python"], "tools/peer_env.sh ray DIR"),
    ],
)
def test_peer_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc = main(["--start-server", "--repository", str(tmp_path), "--model", "m", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_v2_bodies_and_answers() -> None:
    images = [b"\x89PNG" + bytes(range(7)), b"\xff\xd8" + b"x" * 300]
    bodies, headers = load.v2_bytes_bodies(images, "image", "answer")
    width = int(dict(headers)["Inference-Header-Content-Length"])
    for body, data in zip(bodies, images, strict=True):
        head = json.loads(body[:width])  # padded with spaces to one length for all
        assert head["inputs"][0]["parameters"]["binary_data_size"] == 4 + len(data)
        assert head["outputs"] == [{"name": "answer", "parameters": {"binary_data": False}}]
        assert int.from_bytes(body[width : width + 4], "little") == len(data)
        assert body[width + 4 :] == data
    target = load.Target("triton", "http://127.0.0.1:1/", 1, "v2")
    answer = {"model": "m", "results": [{"predictions": []}]}
    good = {"outputs": [{"name": "answer", "data": [json.dumps(answer)]}]}
    assert load.check_answer(json.dumps(good).encode(), target) is None
    for bad in ({"outputs": []}, {"outputs": [{"data": ["{}"]}]}, {"error": "x"}, []):
        assert load.check_answer(json.dumps(bad).encode(), target) is not None
