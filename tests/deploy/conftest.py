"""Shared by the deployment tests: paths, the parsed Dockerfile, tools, YAML."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, cached, run_setup_step
from tests.deploy.dockerfile import Dockerfile, parse

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "resnet-serve.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
RUNTIME_STAGES = ("runtime-cpu", "runtime-gpu")
# The Prometheus Operator's API types for node, pinned by package-lock.json.
SERVICEMONITOR = Path(__file__).parent / "servicemonitor"
SERVICEMONITOR_MODULE = Path("node_modules", "@kubernetes-models", "prometheus-operator")


def tool(name: str) -> str:
    """A console script of the dev extra (beside this interpreter first), or fail."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' provides it")
    return found


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not on PATH: the ServiceMonitor check runs the Prometheus Operator's "
            "API types under Node.js (install nodejs and npm)"
        )
    return found


def _npm_ci(tmp: Path) -> None:
    for name in ("package.json", "package-lock.json"):
        shutil.copy(SERVICEMONITOR / name, tmp / name)
    run_setup_step(
        [_which("npm"), "ci", "--prefix", str(tmp), "--no-audit", "--no-fund",
         "--loglevel=error"],
        "installing tests/deploy/servicemonitor/package-lock.json (npm ci)",
    )  # fmt: skip


@pytest.fixture(scope="session")
def servicemonitor_node() -> tuple[str, Path]:
    """node, and a prefix holding node_modules/ as package-lock.json pins it: installed by
    ``npm ci`` into .cache/tests once per lock file. RESNET_SERVE_SERVICEMONITOR_NODE names
    such a prefix to use instead."""
    node = _which("node")
    given = os.environ.get("RESNET_SERVE_SERVICEMONITOR_NODE")
    if given:
        prefix = Path(given)
    else:
        lock = hashlib.sha256((SERVICEMONITOR / "package-lock.json").read_bytes()).hexdigest()
        prefix = cached(f"servicemonitor-{lock[:16]}", _npm_ci)
    if not (prefix / SERVICEMONITOR_MODULE).is_dir():
        pytest.fail(f"{prefix} has no {SERVICEMONITOR_MODULE}")
    return node, prefix


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse(ROOT / "Dockerfile")


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


_INTERP = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}``, as seen with none of the variables set."""
    if isinstance(value, str):
        return _INTERP.sub(lambda m: m.group("default") or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(COMPOSE_FILE)
    return interpolate(doc)


def drain_timeout_s(dockerfile: Dockerfile, stage: str = "runtime-gpu") -> float:
    return float(dockerfile.environment(stage)[1]["RESNET_SERVE_DRAIN_TIMEOUT_S"])
