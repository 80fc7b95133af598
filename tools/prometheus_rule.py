"""Print the Kubernetes PrometheusRule of deploy/k8s/base, or (--write) write it: the groups
of deploy/prometheus/rules.yml (what docker compose's Prometheus loads) wrapped for the
Prometheus Operator, so that both setups run the same rules.

python tools/prometheus_rule.py [--write]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
TARGET = ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
HEADER = """\
# Generated from deploy/prometheus/rules.yml by `python tools/prometheus_rule.py --write`:
# edit that file, not this one (a test fails when they differ). The Prometheus Operator
# loads these rules; your Prometheus resource's ruleSelector must match these labels
# (kube-prometheus-stack: add `release: <its release name>`, as for the ServiceMonitor).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line expressions stay block literals, as in rules.yml.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "resnet-serve", "labels": {"app.kubernetes.io/name": "resnet-serve"}},
        "spec": {"groups": rules["groups"]},
    }


def render() -> str:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    body = yaml.dump(prometheus_rule(rules), Dumper=_Dumper, sort_keys=False, width=1000)
    return HEADER + body


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        TARGET.write_text(render(), encoding="utf-8")
    else:
        print(render(), end="")
