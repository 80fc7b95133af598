"""deploy/prometheus with Debian's promtool: the scrape config and the rules pass
`promtool check`, and every alert passes its unit tests (tests/deploy/rules_test.yml).

Without promtool on PATH (Debian's `prometheus` package; `.ci/run` installs it) these
tests skip with the reason, except under CI=true, where they fail."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.deploy.conftest import RULES, load_yaml_docs, run

SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES_TEST = Path(__file__).parent / "rules_test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
R20, R56 = "resnet20_cifar10", "resnet56_cifar10"
SCRAPE_S = 1
# What Grafana's $__rate_interval is at that scrape interval: 4 x scrape interval.
RATE_INTERVAL = f"{4 * SCRAPE_S}s"
PNG = {"content-type": "image/png"}


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        reason = f"{name} is not on PATH: apt-get install prometheus (Debian) provides it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; under CI=true it must be there (.ci/run installs it)")
        pytest.skip(reason)
    return found


# --- promtool -------------------------------------------------------------------------


def _promtool(*args: str) -> tuple[int, str]:
    proc = run([binary("promtool"), *args])
    return proc.returncode, proc.stdout + proc.stderr


def test_scrape_config_passes_promtool_check_config() -> None:
    rc, out = _promtool("check", "config", str(SCRAPE_CONFIG))
    assert rc == 0, out
    assert "1 rule files found" in out, out


def test_rules_pass_promtool_check_rules() -> None:
    rc, out = _promtool("check", "rules", str(RULES))
    assert rc == 0, out


def test_alert_unit_tests_pass() -> None:
    rc, out = _promtool("test", "rules", str(RULES_TEST))
    assert rc == 0, out


def test_alert_unit_tests_fail_on_a_broken_rule(tmp_path: Path) -> None:
    """The control: a threshold moved, a label renamed: the unit tests see both."""
    broken = RULES.read_text(encoding="utf-8")
    for old, new in (("ratio_rate5m > 0.05", "ratio_rate5m > 0.5"),
                     ("severity: warning", "severity: info")):  # fmt: skip
        assert old in broken
        broken = broken.replace(old, new)
    (tmp_path / "rules.yml").write_text(broken, encoding="utf-8")
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))
    tests["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(tests), encoding="utf-8")
    rc, out = _promtool("test", "rules", str(tmp_path / "rules_test.yml"))
    assert rc != 0
    assert "ResnetServeServerErrors" in out and "ResnetServeShedding" in out, out


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings."""
    out = set()
    for line in markdown.splitlines():
        if m := re.match(r"^#{1,6}\s+(.*)$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def _alerts() -> list[dict[str, Any]]:
    (rules,) = load_yaml_docs(RULES)
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_is_unit_tested_and_has_a_runbook() -> None:
    anchors = _anchors(OPERATIONS.read_text(encoding="utf-8"))
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = _alerts()
    assert {a["alert"] for a in alerts} == fired, "each alert has a unit test where it fires"
    for a in alerts:
        assert a["labels"]["severity"] in ("critical", "warning"), a["alert"]
        notes = a["annotations"]
        assert notes["summary"] and notes["description"], a["alert"]
        path, _, anchor = notes["runbook_url"].partition("#")
        assert path == "docs/operations.md" and anchor in anchors, (a["alert"], anchor)
        assert anchor == a["alert"].lower()
