"""The runtime-cpu image, built without Docker: this module reads the Dockerfile and runs
its recipe on this machine, so that the recipe cannot drift from what is tested.

- export stage: its `resnet-export` RUN, with this environment's torch (the stage's own
  pip installs are what `.ci/run` did here), MODELS=resnet20_cifar10 and the shared CIFAR
  checkpoints as the `weights` build context;
- venv-cpu stage: its COPY instructions (through .dockerignore) and its RUN, the venv +
  `pip install "/src[cpu]"` + trim-venv.sh, in a fresh virtualenv: the runtime needs no
  torch, and what the trim leaves serves;
- runtime-cpu stage: its ENV, ENTRYPOINT + CMD, HEALTHCHECK and STOPSIGNAL. Its RUN (only
  the user creation, which needs root) is not run; USER is checked in test_dockerfile.py.

Image paths (/opt, /src, /models, /cache) are moved under a temporary root; /weights is the
build context. Then: /readyz until 200, the healthcheck command, a classification, the
dashboard's metric names against a live /metrics scrape, and STOPSIGNAL -> exit 0.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, WEIGHTS_HOME
from tests.deploy.conftest import DASHBOARD, RULES, drain_timeout_s, load_yaml_docs
from tests.deploy.dockerfile import Dockerfile, Instruction, healthcheck_command, parse
from tests.deploy.promql import TARGET_LABELS, dashboard_queries, raw_references, recording_rules

MODEL = "resnet20_cifar10"
IMAGE_ROOTS = ("opt", "src", "models", "cache", "wheels")
_ROOTS = "|".join(IMAGE_ROOTS)
_IMAGE_PATH = re.compile(rf"(?<![\w./~-])/({_ROOTS})(?=/|\b|$)")
_WEIGHTS_PATH = re.compile(r"(?<![\w./~-])/weights(?=/|\b|$)")
_LEFTOVER = re.compile(rf"(?<![\w./~-])/({_ROOTS}|weights)(?=/|\b|$)")
READY_TIMEOUT_S = 180
# What a few requests must have given samples, so that their labels are checked too.
LIVE_METRICS = (
    "requests_total", "request_duration_seconds_bucket", "images_total",
    "queue_wait_seconds_bucket", "preprocess_duration_seconds_bucket",
    "inference_duration_seconds_bucket", "batch_size_bucket", "queue_depth",
)  # fmt: skip
# Series Prometheus itself adds to every scrape target; not the service's to export.
PROMETHEUS_GENERATED = {"up"}


@dataclass
class Image_:
    """The temporary stand-in for the image's file system."""

    root: Path
    weights: Path

    def rebase(self, text: str) -> str:
        text = _WEIGHTS_PATH.sub(str(self.weights), text)
        text = _IMAGE_PATH.sub(lambda m: f"{self.root}/{m.group(1)}", text)
        left = _LEFTOVER.search(text)
        assert left is None, f"an image path escaped the temporary root: {text!r}"
        return text


def _host_env() -> dict[str, str]:
    """What a build step sees of this machine: the proxies and pip settings, and a
    Python on PATH; none of the service's variables or this virtualenv."""
    drop = ("RESNET_SERVE_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "TORCH_HOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def _run_step(image: Image_, ins: Instruction, env: dict[str, str]) -> None:
    for spec in ins.flag_values("mount"):
        opts = dict(kv.split("=", 1) for kv in spec.split(","))
        target = Path(image.rebase(opts["target"]))
        if opts.get("type") == "cache" or opts.get("from") == "wheels":
            # The wheelhouse context left empty, as by default: pip uses its usual sources
            # (tests/deploy/test_container.py builds with a real one).
            target.mkdir(parents=True, exist_ok=True)
        else:
            assert opts.get("from") == "weights" and target == image.weights, spec
    command = image.rebase(ins.rest)
    env = {k: image.rebase(v) for k, v in env.items()}
    proc = subprocess.run(
        ["/bin/sh", "-c", command], cwd=image.root, env=env,
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"line {ins.line}: {command}\n{proc.stdout}\n{proc.stderr}"


def _copy_from_context(image: Image_, ins: Instruction) -> None:
    *sources, dest = ins.rest.split()
    target = Path(image.rebase(dest))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")  # as .dockerignore does
    for src in sources:
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, target, ignore=ignore, dirs_exist_ok=True)
        else:
            into = target / path.name if dest.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into)


def _stage_env(
    df: Dockerfile, stage: str, build_args: dict[str, str] | None = None
) -> dict[str, str]:
    host = _host_env()
    args, env = df.environment(stage, build_args, base_env={"PATH": host["PATH"]})
    return {**host, **args, **env}


def _build_export(df: Dockerfile, image: Image_) -> None:
    stage = df.stage("export")
    runs = stage.all("RUN")
    exports = [i for i in runs if "resnet-export" in i.rest]
    assert len(exports) == 1, "one RUN exports the models"
    for ins in runs:
        if ins is not exports[0]:
            assert re.match(r"pip install\b", ins.rest), f"line {ins.line}: not run here"
    _run_step(image, exports[0], _stage_env(df, "export", {"MODELS": MODEL}))


def _build_venv(df: Dockerfile, image: Image_) -> None:
    stage = df.stage("venv-cpu")
    for ins in stage.instructions:
        if ins.keyword == "COPY":
            assert ins.flag("from") is None
            _copy_from_context(image, ins)
        elif ins.keyword == "RUN":
            _run_step(image, ins, _stage_env(df, "venv-cpu"))
        else:
            assert ins.keyword in ("ARG", "ENV"), f"line {ins.line}: {ins.keyword} not emulated"


def _finish_runtime(df: Dockerfile, image: Image_) -> None:
    for ins in df.stage("runtime-cpu").instructions:
        if ins.keyword == "RUN":
            for part in ins.rest.split("&&"):
                assert re.match(r"\s*(groupadd|useradd)\b", part), f"line {ins.line}: not run here"
        elif ins.keyword == "COPY":
            src, dest = ins.rest.split()
            assert ins.flag("from") in ("venv-cpu", "export") and src == dest, ins
            assert Path(image.rebase(src)).is_dir(), f"nothing at {src} from {ins.flag('from')}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    env: dict[str, str]
    venv: Path
    df: Dockerfile
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-6000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    df = parse(ROOT / "Dockerfile")
    if not (WEIGHTS_HOME / "hub" / "checkpoints").is_dir():
        pytest.fail(f"{WEIGHTS_HOME} is missing: the suite needs ../shared beside the checkout")
    image = Image_(tmp_path_factory.mktemp("image"), WEIGHTS_HOME)
    _build_export(df, image)
    _build_venv(df, image)
    _finish_runtime(df, image)

    _, image_env = df.environment("runtime-cpu", base_env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    port = _free_port()
    home = tmp_path_factory.mktemp("home")
    # The container's environment: the image's ENV and nothing of this machine's, plus
    # the port, as `docker run -e RESNET_SERVE_PORT=...` would set it.
    env = {
        "HOME": str(home),
        "LANG": "C.UTF-8",
        **{k: image.rebase(v) for k, v in image_env.items()},
    }
    env["RESNET_SERVE_PORT"] = str(port)
    stage = df.stage("runtime-cpu")
    entrypoint, cmd = stage.last("ENTRYPOINT"), stage.last("CMD")
    assert entrypoint is not None and cmd is not None
    argv = [*(entrypoint.exec_form() or []), *(cmd.exec_form() or [])]
    venv = Path(image.rebase(df.environment("venv-cpu")[1]["VIRTUAL_ENV"]))
    exe = shutil.which(argv[0], path=env["PATH"])
    assert exe is not None and Path(exe).parent == venv / "bin", f"{argv[0]} -> {exe}"

    log = home / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, *argv[1:]], env=env, cwd=home, stdout=out, stderr=out)
    srv = Server(proc, f"http://127.0.0.1:{port}", env, venv, df, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"resnet-serve exited {proc.returncode}:\n{srv.output()}"
            try:
                if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in {READY_TIMEOUT_S}s:\n{srv.output()}"
            time.sleep(0.2)
        yield srv
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_the_runtime_venv_has_no_torch(server: Server) -> None:
    probe = (
        "import importlib.metadata as md, importlib.util as u, json; "
        "print(json.dumps({'torch': u.find_spec('torch') is not None, "
        "'dists': sorted(d.metadata['Name'].lower() for d in md.distributions())}))"
    )
    out = subprocess.run([str(server.venv / "bin" / "python"), "-c", probe],
                         capture_output=True, text=True, check=True)  # fmt: skip
    found = json.loads(out.stdout)
    assert found["torch"] is False
    assert "onnxruntime" in found["dists"] and "onnxruntime-gpu" not in found["dists"]
    assert "resnet-serve" in found["dists"]


def _healthcheck(server: Server, port: str) -> int:
    health = server.df.stage("runtime-cpu").last("HEALTHCHECK")
    assert health is not None
    argv = healthcheck_command(health)
    exe = shutil.which(argv[0], path=server.env["PATH"])
    assert exe is not None and Path(exe).parent == server.venv / "bin"
    env = {**server.env, "RESNET_SERVE_PORT": port}
    return subprocess.run([exe, *argv[1:]], env=env, capture_output=True, timeout=30).returncode


def test_ready_and_the_healthcheck_passes(server: Server) -> None:
    assert httpx.get(f"{server.url}/readyz").json()["models"] == {MODEL: True}
    assert _healthcheck(server, server.env["RESNET_SERVE_PORT"]) == 0
    # The control: nothing listens there, and the same command reports unhealthy.
    assert _healthcheck(server, str(_free_port())) != 0


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_classify_through_the_image_recipe(
    server: Server, cifar_test: dict[str, np.ndarray]
) -> None:
    files = [("file", (f"{i}.png", _png(cifar_test["images"][i]), "image/png")) for i in range(8)]
    r = httpx.post(f"{server.url}/v1/classify", files=files, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and len(body["results"]) == 8
    classes = [str(c) for c in cifar_test["classes"]]
    top1 = [res["predictions"][0]["label"] for res in body["results"]]
    truth = [classes[int(k)] for k in cifar_test["labels"][:8]]
    assert sum(a == b for a, b in zip(top1, truth, strict=True)) >= 6, (top1, truth)
    # An error for the dashboard's status panel to find.
    r = httpx.post(f"{server.url}/v1/models/nope/classify", files=files[:1], timeout=60)
    assert r.status_code == 404


def _exported(text: str) -> dict[str, set[str] | None]:
    """Sample name -> its label names (None: the family is declared, no sample yet)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("", "_sum", "_count", "_created"),
    }
    out: dict[str, set[str] | None] = {}
    for fam in text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, ("",)):
            out.setdefault(fam.name + suffix, None)
        for s in fam.samples:
            out[s.name] = (out.get(s.name) or set()) | set(s.labels)
    return out


def dashboard_problems(
    dashboard: dict[str, Any], exported: dict[str, set[str] | None]
) -> list[str]:
    """Names and labels of the dashboard's queries, and of the recording rules (and alerts)
    of deploy/prometheus/rules.yml, that the live service does not export. A recorded
    series stands for what its rule reads."""
    (rules,) = load_yaml_docs(RULES)
    recorded = recording_rules(rules)
    alerts = [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]
              if "alert" in r]  # fmt: skip
    problems = []
    for where, expr in [*dashboard_queries(dashboard), *recorded.items(), *alerts]:
        metrics, labels = raw_references(expr, recorded)
        own = metrics - PROMETHEUS_GENERATED
        if not metrics:
            problems.append(f"{where}: no metric in {expr!r}")
        for m in sorted(own - exported.keys()):
            problems.append(f"{where}: {m} is not exported")
        label_sets = [exported.get(m) for m in own]
        if own and all(ls is not None for ls in label_sets):
            known = set().union(*(ls for ls in label_sets if ls is not None)) | TARGET_LABELS
            for label in sorted(labels - known):
                problems.append(f"{where}: label {label!r} is on none of {sorted(own)}")
    return problems


def test_dashboard_queries_name_exported_metrics(server: Server) -> None:
    # A successful and a failed request of its own, so that their series have samples
    # whichever tests ran before.
    png = _png(np.zeros((32, 32, 3), np.uint8))
    httpx.post(f"{server.url}/v1/embed", content=png, headers={"content-type": "image/png"},
               timeout=60).raise_for_status()  # fmt: skip
    r = httpx.post(f"{server.url}/v1/models/nope/embed", content=png,
                   headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
    assert r.status_code == 404
    exported = _exported(httpx.get(f"{server.url}/metrics").text)
    for name in LIVE_METRICS:
        assert exported.get(f"resnet_serve_{name}"), f"resnet_serve_{name} has no samples"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard_problems(dashboard, exported) == []

    # The control: a renamed metric and a misspelt label are caught.
    broken = json.loads(
        DASHBOARD.read_text(encoding="utf-8")
        .replace("resnet_serve_queue_depth", "resnet_serve_queue_length")
        .replace("sum by (status, endpoint, model)", "sum by (status_code, endpoint, model)")
    )
    found = "\n".join(dashboard_problems(broken, exported))
    assert "resnet_serve_queue_length is not exported" in found
    assert "label 'status_code'" in found


def test_stop_signal_drains_and_exits_zero(server: Server) -> None:
    # Stops the module's server: defined last in the module, so it runs last.
    stop = server.df.stage("runtime-cpu").last("STOPSIGNAL")
    assert stop is not None
    server.proc.send_signal(getattr(signal, stop.rest))
    limit = 2 * drain_timeout_s(server.df, "runtime-cpu") + 15
    try:
        rc = server.proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {limit:.0f}s after {stop.rest}:\n{server.output()}")
    assert rc == 0, server.output()
    assert "Traceback" not in server.output(), server.output()
