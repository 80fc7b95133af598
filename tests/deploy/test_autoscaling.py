"""Queue-based autoscaling: the HorizontalPodAutoscaler's Pods metric is the one the
prometheus-adapter rule of deploy/prometheus-adapter/values.yaml serves, from a series
the service exports, with a query promtool accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from resnet_serve.service.metrics import Metrics
from tests.deploy.conftest import DEPLOY, K8S, load_yaml_docs, run
from tests.deploy.test_prometheus import binary

VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"


def _rule() -> dict[str, Any]:
    (values,) = load_yaml_docs(VALUES)
    assert values["rules"]["default"] is False, "only the project's rule"
    (rule,) = values["rules"]["custom"]
    return rule


def _hpa_pod_metrics() -> dict[str, dict[str, Any]]:
    (hpa,) = load_yaml_docs(K8S / "base" / "hpa.yaml")
    return {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"]
            if m["type"] == "Pods"}  # fmt: skip


def test_hpa_scales_on_the_adapters_queue_metric() -> None:
    rule = _rule()
    served = rule["name"]["as"]
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    targets = _hpa_pod_metrics()
    assert set(targets) == {served}
    assert targets[served]["type"] == "AverageValue" and float(targets[served]["averageValue"]) > 0
    # A series of the service, per model: the rule sums it over each pod's models.
    exported = {fam.name for fam in Metrics().registry.collect()}
    assert series.group(1) in exported
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def _rendered(rule: dict[str, Any]) -> str:
    """The adapter's template, as it fills it in for a request about two pods."""
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["seriesQuery"].split("{")[0])
        .replace("<<.LabelMatchers>>", 'namespace="resnet-serve",pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )


def test_adapter_query_passes_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    for expr, ok in ((_rendered(_rule()), True), ("sum by (pod) (x{", False)):
        doc = {"groups": [{"name": "adapter", "rules": [{"record": "q", "expr": expr}]}]}
        rules.write_text(yaml.safe_dump(doc), encoding="utf-8")
        proc = run([binary("promtool"), "check", "rules", str(rules)])
        assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
