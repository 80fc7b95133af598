"""docker-compose.yml against the compose spec, and against the files it points at:
the Dockerfile's targets and ports, Prometheus' scrape config, Grafana's provisioning."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.deploy.conftest import (
    COMPOSE_FILE,
    DASHBOARD,
    DEPLOY,
    RULES,
    drain_timeout_s,
    load_yaml_docs,
    run,
    tool,
)
from tests.deploy.dockerfile import Dockerfile
from tests.deploy.promql import dashboard_queries, raw_references, recording_rules, references

SERVE = {"resnet-serve": ("gpu", "runtime-gpu"), "resnet-serve-cpu": ("cpu", "runtime-cpu")}


def _check_jsonschema(path: Path) -> tuple[int, str]:
    argv = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    proc = run(argv)
    return proc.returncode, proc.stdout + proc.stderr


def test_compose_file_validates_against_the_compose_spec() -> None:
    rc, out = _check_jsonschema(COMPOSE_FILE)
    assert rc == 0, out


def test_compose_spec_check_fails_on_a_wrong_key(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "stop_grace_period:" in text
    bad.write_text(text.replace("stop_grace_period:", "stop_grace_periode:"), encoding="utf-8")
    rc, out = _check_jsonschema(bad)
    assert rc != 0, out


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * units[suffix]
    raise ValueError(duration)


@pytest.mark.parametrize("name", SERVE)
def test_serve_services(compose: dict[str, Any], dockerfile: Dockerfile, name: str) -> None:
    profile, target = SERVE[name]
    svc = compose["services"][name]
    assert svc["profiles"] == [profile]
    assert svc["build"]["target"] == target and target in dockerfile.stage_names
    assert svc["build"]["context"] == "."
    # The named build context replaces the Dockerfile's `weights` stage.
    for context in ("weights", "wheels"):
        assert context in svc["build"]["additional_contexts"]
        assert context in dockerfile.stage_names
    export_args = set(dockerfile.environment("export")[0])
    assert set(svc["build"]["args"]) <= export_args, "build args the export stage declares"
    _, env = dockerfile.environment(target)
    container_ports = {p.rsplit(":", 1)[1] for p in svc["ports"]}
    assert container_ports == {env["RESNET_SERVE_PORT"]}
    mounts = {v.split(":")[1] for v in svc["volumes"]}
    assert env["RESNET_SERVE_REPOSITORY"] in mounts, "the model volume is the repository"
    assert svc["stop_signal"] == "SIGTERM"
    # Docker kills after stop_grace_period; the drain may take up to twice its timeout.
    assert _seconds(svc["stop_grace_period"]) > 2 * drain_timeout_s(dockerfile, target)
    # No healthcheck of its own: the image's HEALTHCHECK is the one depends_on waits for.
    assert "healthcheck" not in svc and dockerfile.stage(target).last("HEALTHCHECK")


def test_gpu_reservation_only_on_the_gpu_service(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["resnet-serve"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["environment"]["RESNET_SERVE_DEVICE"] == "cuda"
    cpu = compose["services"]["resnet-serve-cpu"]
    assert "deploy" not in cpu and cpu["environment"]["RESNET_SERVE_DEVICE"] == "cpu"


def test_depends_on_waits_for_health(compose: dict[str, Any], dockerfile: Dockerfile) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            target = services[dep].get("build", {}).get("target")
            has_check = "healthcheck" in services[dep] or (
                target and dockerfile.stage(target).last("HEALTHCHECK") is not None
            )
            assert has_check, f"{name} waits for {dep}'s health, which nothing checks"
    assert set(services["prometheus"]["depends_on"]) == set(SERVE)
    assert all(c["required"] is False for c in services["prometheus"]["depends_on"].values())
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}


def _bind_mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path, for the host-directory mounts of a service."""
    out = {}
    for v in svc.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            out[dst] = ROOT / src
    return out


def test_prometheus_scrapes_the_service(compose: dict[str, Any], dockerfile: Dockerfile) -> None:
    prom = compose["services"]["prometheus"]
    mounts = _bind_mounts(prom)
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    (config,) = load_yaml_docs(mounts[config_arg.split("=", 1)[1]])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "resnet-serve"]
    assert job["metrics_path"] == "/metrics"
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    port_env = dockerfile.environment("runtime-cpu")[1]["RESNET_SERVE_PORT"]
    assert port == port_env
    # Reachable by that name in either profile: the service name or a network alias.
    for name in SERVE:
        svc = compose["services"][name]
        aliases = svc.get("networks", {}).get("default", {}).get("aliases", [])
        assert host in (name, *aliases), f"{name} is not reachable as {host}"


def test_prometheus_loads_the_rules(compose: dict[str, Any]) -> None:
    """rule_files resolve, relative to the config, to the mounted rules.yml in the container
    as in the repository (where promtool checks them: tests/deploy/test_prometheus.py)."""
    prom = compose["services"]["prometheus"]
    mounts = _bind_mounts(prom)
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    (config,) = load_yaml_docs(mounts[config_path])
    assert config["rule_files"], "no rule_files"
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert mounts.get(in_container) == RULES, (rule_file, mounts)
        assert (mounts[config_path].parent / rule_file).resolve() == RULES.resolve()


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    graf = compose["services"]["grafana"]
    mounts = _bind_mounts(graf)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    (ds_doc,) = load_yaml_docs(provisioning / "datasources" / "prometheus.yml")
    (ds,) = ds_doc["datasources"]
    prom_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert ds["url"] == f"http://prometheus:{prom_port}" and ds["type"] == "prometheus"
    (dash_doc,) = load_yaml_docs(provisioning / "dashboards" / "resnet-serve.yml")
    (provider,) = dash_doc["providers"]
    dash_dir = provider["options"]["path"]
    assert mounts[dash_dir] == DASHBOARD.parent
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/{DASHBOARD.name}"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    # Every panel, query and query variable uses the datasource variable, whose default is
    # the provisioned datasource: imported into another Grafana, the user picks theirs.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    var = variables["datasource"]
    assert var["type"] == "datasource" and var["query"] == ds["type"]
    assert var["current"]["value"] == ds["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    queries = [t for p in panels for t in p["targets"]]
    queried = [v for v in variables.values() if v["type"] == "query"]
    refs = {json.dumps(x["datasource"], sort_keys=True) for x in (*panels, *queries, *queried)}
    assert refs == {json.dumps({"type": ds["type"], "uid": "${datasource}"}, sort_keys=True)}


def test_host_paths_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for dst, src in _bind_mounts(svc).items():
            assert src.exists(), f"{name}: {src} (mounted at {dst}) is missing"
        contexts = svc.get("build", {}).get("additional_contexts", {})
        for ctx, src in contexts.items():
            assert (ROOT / src).is_dir(), f"{name}: build context {ctx}={src} is missing"


# Series without a model label: a process or a scrape target, not a model.
PROCESS_WIDE = {"up", "resnet_serve_requests_in_flight", "resnet_serve_time_to_ready_seconds",
                "resnet_serve_latency_slo_seconds"}  # fmt: skip


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    (rules,) = load_yaml_docs(RULES)
    recorded = recording_rules(rules)
    queries = dashboard_queries(dashboard)
    exprs = [e for _, e in queries]
    used = set().union(*(raw_references(e, recorded)[0] for e in exprs))
    for metric in ("images_total", "requests_total", "request_duration_seconds_bucket",
                   "queue_depth", "batch_size_bucket", "admitted_images", "max_queue_images",
                   "inference_failures_total", "requests_in_flight", "sessions_healthy",
                   "rejected_images_total"):  # fmt: skip
        assert f"resnet_serve_{metric}" in used, metric
    # The recording rules the dashboard reads, and what they compute.
    read = {m for e in exprs for m in references(e)[0] if m in recorded}
    assert read, "the heavy panels read recorded series"
    while more := {m for r in read for m in references(recorded[r])[0] if m in recorded} - read:
        read |= more  # and the recorded series those rules read
    rule_exprs = [recorded[m] for m in read]
    assert any("histogram_quantile(0.5," in e for e in rule_exprs), "p50"
    assert any("histogram_quantile(0.99," in e for e in rule_exprs), "p99"
    assert any('status_class="2xx"' in e for e in rule_exprs), "successful requests' latency"
    assert any(re.search(r"by \(status\b", e) for e in exprs), "errors by status code"
    # Server and client errors apart: a 4xx is not the service's failure.
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    stats = {p["title"]: p["targets"][0]["expr"] for p in panels if p["type"] == "stat"}
    assert 'status=~"5.."' in stats["Server errors (5xx)"]
    assert 'status=~"4.."' in stats["Client errors (4xx)"]
    assert not any('"[45].."' in e for e in stats.values())
    assert any(p["type"] == "heatmap" and "batch_size" in p["targets"][0]["expr"] for p in panels)
    # Per model: every query of a per-model series follows the model selector.
    for where, expr in queries:
        metrics = references(expr)[0]
        if metrics - PROCESS_WIDE and not where.startswith("variable"):
            assert 'model=~"$model"' in expr, where
    # The model variable lists the served models from the start (a series every model has
    # at once, not one that appears with the first request).
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    assert var["query"]["query"] == "label_values(resnet_serve_model_ready, model)"
