"""The metric and label names a PromQL expression (or a Grafana query using one) refers to.

Not a PromQL parser: enough to find the selectors of the expressions in this project's
dashboard, and strict enough that an unknown construct shows up as an unknown name."""

from __future__ import annotations

import re

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "atan2", "inf", "nan"}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*(\w+)\s*\)$")


def references(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) of a PromQL expression or of a Grafana
    ``label_values(metric, label)`` variable query."""
    if m := _LABEL_VALUES.match(expr.strip()):
        return {m.group(1)}, {m.group(2)}
    labels: set[str] = set()
    text = _STRING.sub('""', expr)
    for body in _MATCHERS.findall(text):
        labels |= {n for n in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body)}
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    for _, body in _GROUPING.findall(text):
        labels |= {n.strip() for n in body.split(",") if n.strip()}
    text = _GROUPING.sub(" ", text)
    metrics = set()
    for m in _NAME.finditer(text):
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if m.group().lower() in KEYWORDS or text[max(0, m.start() - 1)].isdigit():
            continue  # keyword, or the exponent/unit of a number literal
        metrics.add(m.group())
    return metrics, labels


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    """(where, expression) for every panel target and query variable of a dashboard,
    rows' nested panels included."""
    out = []

    def panels(items: list[dict]) -> None:  # type: ignore[type-arg]
        for p in items:
            panels(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))

    panels(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            out.append((f"variable {var['name']!r}", q["query"] if isinstance(q, dict) else q))
    return out


# Labels Prometheus attaches to every series of a scrape target (and the Prometheus
# Operator's relabelling on Kubernetes): not the service's to export.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container"}


def recording_rules(rules: dict) -> dict[str, str]:  # type: ignore[type-arg]
    """record name -> expression, of a Prometheus rule file."""
    return {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def raw_references(expr: str, recorded: dict[str, str]) -> tuple[set[str], set[str]]:
    """references(), with each recorded series replaced by what its rule reads (and the
    labels that rule uses), down to the exported metrics."""
    metrics, labels = references(expr)
    out: set[str] = set()
    for name in metrics:
        if name in recorded:
            inner, inner_labels = raw_references(recorded[name], recorded)
            out |= inner
            labels |= inner_labels
        else:
            out.add(name)
    return out, labels


def grafana_to_promql(expr: str, rate_interval: str) -> str:
    """A dashboard query as Grafana sends it with every model selected."""
    return expr.replace("$__rate_interval", rate_interval).replace("$model", ".*")
