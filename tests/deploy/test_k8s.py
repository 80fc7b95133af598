"""deploy/k8s: every manifest validated offline (kubernetes-validate --strict; the
ServiceMonitor and PrometheusRule CRDs with the Prometheus Operator's API types), the
kustomizations rendered by a real kustomize, and the settings that must agree with the
image and each other."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    K8S,
    SERVICEMONITOR,
    drain_timeout_s,
    load_yaml_docs,
    run,
    tool,
)
from tests.deploy.dockerfile import Dockerfile
from tools import prometheus_rule

BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAYS]
# Oldest and newest Kubernetes the manifests must be valid for.
K8S_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
SERVICEMONITOR_JS = SERVICEMONITOR / "validate.mjs"


def _kustomization(path: Path) -> dict[str, Any]:
    (doc,) = load_yaml_docs(path / "kustomization.yaml")
    return doc


def _base_resource_files() -> list[Path]:
    return [BASE / r for r in _kustomization(BASE)["resources"]]


# --- kubernetes-validate --------------------------------------------------------------


def _kubernetes_validate(paths: list[Path]) -> tuple[int, list[str]]:
    argv = [tool("kubernetes-validate"), "--strict"]
    for v in K8S_VERSIONS:
        argv += ["-k", v]
    proc = run([*argv, *map(str, paths)])
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def _check_validate_output(rc: int, lines: list[str], docs: list[dict[str, Any]]) -> None:
    """kubernetes-validate only WARNs (rc 0) for a kind it has no schema for, which would
    pass a typo in apiVersion: every resource must have *passed*, except the CRDs."""
    assert rc == 0, "\n".join(lines)
    for doc in docs:
        kn = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        passed = [ln for ln in lines if ln.startswith("INFO") and f"resource {kn} " in ln]
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            assert not passed
        else:
            assert len(passed) == len(K8S_VERSIONS), f"{kn} not validated:\n" + "\n".join(lines)
    warns = [ln for ln in lines if ln.startswith("WARN")]
    crd_warns = [
        ln for ln in warns if any(f"kind {k} with api version {a} " in ln for a, k in CRD_KINDS)
    ]
    assert warns == crd_warns, warns


def test_base_manifests_validate_strictly() -> None:
    files = _base_resource_files()
    docs = [d for f in files for d in load_yaml_docs(f)]
    rc, lines = _kubernetes_validate(files)
    _check_validate_output(rc, lines, docs)


def test_strict_validation_fails_on_an_unknown_field(tmp_path: Path) -> None:
    text = (BASE / "deployment.yaml").read_text(encoding="utf-8")
    bad = tmp_path / "deployment.yaml"
    bad.write_text(text.replace("terminationGracePeriodSeconds:", "terminationGraceSeconds:"))
    rc, lines = _kubernetes_validate([bad])
    assert rc != 0 and any("terminationGraceSeconds" in ln for ln in lines), lines


# --- ServiceMonitor, PrometheusRule: CRDs, validated with the Operator's API types -----


def _validate_crds(node: tuple[str, Path], objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``node``: the servicemonitor_node fixture (tests/deploy/conftest.py)."""
    binary, prefix = node
    proc = subprocess.run(
        [binary, str(SERVICEMONITOR_JS), str(prefix)],
        input=json.dumps(objs), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _servicemonitor() -> dict[str, Any]:
    (doc,) = load_yaml_docs(BASE / "servicemonitor.yaml")
    return doc


def _prometheusrule() -> dict[str, Any]:
    (doc,) = load_yaml_docs(BASE / "prometheusrule.yaml")
    return doc


@pytest.mark.parametrize("read", [_servicemonitor, _prometheusrule], ids=lambda f: f.__name__[1:])
def test_crds_validate_against_the_operator_types(
    servicemonitor_node: tuple[str, Path], read: Any
) -> None:
    (result,) = _validate_crds(servicemonitor_node, [read()])
    assert result["ok"], result["errors"]


@pytest.mark.parametrize(
    ("path", "value"),
    [(("spec", "endpoints", 0, "interval"), "15 seconds"),
     (("spec", "endpoints", 0, "port"), 8000),
     (("apiVersion",), "monitoring.coreos.com/v1beta1")],
)  # fmt: skip
def test_servicemonitor_check_fails_on_a_broken_one(
    servicemonitor_node: tuple[str, Path], path: tuple[Any, ...], value: Any
) -> None:
    doc = _servicemonitor()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (result,) = _validate_crds(servicemonitor_node, [doc])
    assert not result["ok"]


def test_servicemonitor_selects_the_service() -> None:
    """What the schema cannot see: a ServiceMonitor that selects no Service, or names a
    port the Service does not have, scrapes nothing."""
    sm = _servicemonitor()
    (svc,) = load_yaml_docs(BASE / "service.yaml")
    labels = svc["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"


def _break_first_alert(doc: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    alerts = [r for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r]
    if value is None:
        del alerts[0][key]
    else:
        alerts[0][key] = value
    return doc


@pytest.mark.parametrize(
    ("key", "value"),
    [("for", "5 minutes"), ("expr", None), ("labels", {"severity": 1}),
     ("apiVersion", "monitoring.coreos.com/v1beta1")],
)  # fmt: skip
def test_prometheusrule_check_fails_on_a_broken_one(
    servicemonitor_node: tuple[str, Path], key: str, value: Any
) -> None:
    doc = _prometheusrule()
    doc = {**doc, key: value} if key == "apiVersion" else _break_first_alert(doc, key, value)
    (result,) = _validate_crds(servicemonitor_node, [doc])
    assert not result["ok"]


def test_prometheusrule_holds_the_rules_compose_loads() -> None:
    """The same groups as deploy/prometheus/rules.yml, as tools/prometheus_rule.py renders
    them (the file is generated, not edited by hand)."""
    assert (BASE / "prometheusrule.yaml").read_text(encoding="utf-8") == prometheus_rule.render()
    (rules,) = load_yaml_docs(prometheus_rule.RULES)
    assert _prometheusrule()["spec"]["groups"] == rules["groups"]
    sm = _servicemonitor()
    assert _prometheusrule()["metadata"]["labels"] == sm["metadata"]["labels"]


# --- kustomize ------------------------------------------------------------------------


@cache
def _renderer() -> list[str]:
    """A kustomize v5: RESNET_SERVE_KUSTOMIZE (a kustomize or kubectl binary), else
    `kustomize`, else `kubectl kustomize` from PATH."""
    candidates = [
        os.environ.get("RESNET_SERVE_KUSTOMIZE"),
        shutil.which("kustomize"),
        shutil.which("kubectl"),
    ]
    seen = []
    for binary in filter(None, candidates):
        if Path(binary).name.startswith("kubectl"):
            out = run([binary, "version", "--client", "-o", "json"]).stdout
            version = json.loads(out or "{}").get("kustomizeVersion", "none")
            argv = [binary, "kustomize"]
        else:
            version = run([binary, "version"]).stdout.strip()
            argv = [binary, "build"]
        m = re.search(r"v(\d+)\.", version)
        if m and int(m.group(1)) >= 5:
            return argv
        seen.append(f"{binary} (kustomize {version})")
    pytest.fail(
        "rendering deploy/k8s needs kustomize v5 (`kustomize`, or `kubectl` >= 1.27); found: "
        f"{', '.join(seen) or 'none'}. No package registry reachable here ships one "
        "(Debian bookworm's kubernetes-client is kubectl 1.20 with kustomize v2.0.3, which "
        "predates `labels` and `patches`). Set RESNET_SERVE_KUSTOMIZE to a binary."
    )


@cache
def _render(path: Path) -> tuple[dict[str, Any], ...]:
    proc = run([*_renderer(), str(path)])
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_kustomization_renders_valid_manifests(
    path: Path, tmp_path: Path, servicemonitor_node: tuple[str, Path]
) -> None:
    docs = list(_render(path))
    kinds = sorted(d["kind"] for d in docs)
    expected = [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceMonitor",
    ]
    assert kinds == expected
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    rc, lines = _kubernetes_validate([out])
    _check_validate_output(rc, lines, docs)
    crds = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert len(crds) == len(CRD_KINDS)
    results = _validate_crds(servicemonitor_node, crds)
    assert all(r["ok"] for r in results), results


def test_every_k8s_file_is_used() -> None:
    """No manifest escapes the checks above: each YAML file under deploy/k8s is a
    kustomization, a resource of one, or a patch of one."""
    used: set[Path] = set()
    for k in KUSTOMIZATIONS:
        doc = _kustomization(k)
        used.add(k / "kustomization.yaml")
        used |= {(k / r).resolve() for r in doc.get("resources", []) if (k / r).is_file()}
        used |= {(k / p["path"]).resolve() for p in doc.get("patches", []) if "path" in p}
    files = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert files == {p.resolve() for p in used}, files ^ {p.resolve() for p in used}


def _deployment(path: Path) -> dict[str, Any]:
    return next(d for d in _render(path) if d["kind"] == "Deployment")


def _container(deploy: dict[str, Any]) -> dict[str, Any]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_gpu_base_and_cpu_overlay() -> None:
    gpu = _container(_deployment(BASE))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env(gpu)["RESNET_SERVE_DEVICE"] == "cuda"
    cpu_docs = _render(K8S / "overlays" / "cpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(cpu_docs)
    cpu = _container(next(d for d in cpu_docs if d["kind"] == "Deployment"))
    assert _env(cpu)["RESNET_SERVE_DEVICE"] == "cpu"
    assert gpu["image"].endswith("-gpu") and cpu["image"].endswith("-cpu")
    assert gpu["image"].rsplit(":", 1)[0] == cpu["image"].rsplit(":", 1)[0]


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_probes_and_graceful_shutdown(path: Path, dockerfile: Dockerfile) -> None:
    deploy = _deployment(path)
    pod = deploy["spec"]["template"]["spec"]
    c = _container(deploy)
    image_env = dockerfile.environment("runtime-gpu")[1]
    (port,) = c["ports"]
    assert str(port["containerPort"]) == image_env["RESNET_SERVE_PORT"]
    for probe, endpoint in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                            ("startupProbe", "/readyz")):  # fmt: skip
        get = c[probe]["httpGet"]
        assert get["path"] == endpoint and get["port"] == port["name"], probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time for warm-up"
    # The pod must outlive preStop + the whole drain, which may take twice its timeout.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(_env(c).get("RESNET_SERVE_DRAIN_TIMEOUT_S", drain_timeout_s(dockerfile)))
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + 2 * drain
    # Runs as the image's user.
    user = dockerfile.stage("runtime-gpu").last("USER")
    assert user is not None
    assert pod["securityContext"]["runAsUser"] == int(user.rest.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_objects_point_at_each_other(path: Path) -> None:
    docs = {d["kind"]: d for d in _render(path)}
    deploy = docs["Deployment"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    assert docs["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert (
        docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    )
    ref = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deploy["metadata"]["name"])
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2, "PDB needs two"
    # CPU utilisation targets need a CPU request.
    assert "cpu" in _container(deploy)["resources"]["requests"]
    svc_port = docs["Service"]["spec"]["ports"][0]["targetPort"]
    assert svc_port == _container(deploy)["ports"][0]["name"]
