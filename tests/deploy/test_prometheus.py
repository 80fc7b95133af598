"""deploy/prometheus with Debian's Prometheus and promtool: the scrape config and the rules
pass `promtool check`, every alert passes its unit tests (tests/deploy/rules_test.yml),
and a real Prometheus scraping a live service with the project's own scrape config
evaluates every expression of the dashboard and of the rules, at rest and after mixed
traffic (classify, embed, V2, client errors, inference failures, shedding, a retired
model).

Without prometheus/promtool on PATH (Debian's `prometheus` package; `.ci/run` installs it)
these tests skip with the reason, except under CI=true, where they fail."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from resnet_serve.service.settings import Settings
from tests.conftest import ROOT
from tests.deploy.conftest import DASHBOARD, RULES, load_yaml_docs, run
from tests.deploy.promql import dashboard_queries, grafana_to_promql
from tests.service.faults import fail_runs, hold_runs, retire_sessions
from tests.service.servers import ThreadServer, free_port, png, wait_until

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


# --- a real Prometheus against a live service -------------------------------------------


def _self_check_failing_copy(source: Path, target: Path) -> None:
    """A model directory whose model.json asks its self-check for the impossible: served
    under --self-check warn with resnet_serve_model_self_check 0."""
    target.mkdir()
    for f in source.iterdir():
        if f.name != "model.json":
            (target / f.name).symlink_to(f)
    meta = json.loads((source / "model.json").read_text(encoding="utf-8"))
    meta["self_check"]["min_top1_agreement"] = 1.5
    (target / "model.json").write_text(json.dumps(meta), encoding="utf-8")


def _prometheus_config(service_port: int, dead_port: int, prom_port: int) -> dict[str, Any]:
    """The project's scrape config, pointed at this machine: the service, a target with
    nothing behind it (for the target-down alert), Prometheus itself; scraping and rule
    evaluation every second."""
    (config,) = load_yaml_docs(SCRAPE_CONFIG)
    config["global"].update(
        scrape_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s",
        evaluation_interval=f"{SCRAPE_S}s",
    )  # fmt: skip
    config["rule_files"] = [str((SCRAPE_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [f"127.0.0.1:{service_port}", f"127.0.0.1:{dead_port}"]
    jobs["resnet-serve"]["static_configs"] = [{"targets": targets}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    return config


class Prometheus:
    def __init__(self, config: dict[str, Any], workdir: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary("prometheus"), f"--config.file={config_file}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.output()}")
            return httpx.get(self.url + "/-/ready").status_code == 200

        wait_until(ready, timeout=30, interval=0.2)

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=SCRAPE_S)
        return data["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query and every rule, as Prometheus gets them."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = [(w, grafana_to_promql(e, RATE_INTERVAL)) for w, e in dashboard_queries(dashboard)
           if not e.startswith("label_values(")]  # fmt: skip
    (rules,) = load_yaml_docs(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            out.append((f"{'record' if 'record' in rule else 'alert'} {name}", rule["expr"]))
    return out


def _values(series: dict[str, Any]) -> list[float]:
    return [float(v) for _, v in series["values"]]


def _check(
    prom: Prometheus,
    expressions: list[tuple[str, str]],
    start: float,
    end: float,
    must_have_data: bool,
) -> list[str]:
    """Each expression over [start, end]: none errors (prom.api asserts), no series is
    NaN throughout, and (``must_have_data``) each returns a number somewhere."""
    problems = []
    for where, expr in expressions:
        result = prom.query_range(expr, start, end)
        for series in result:
            if all(math.isnan(v) for v in _values(series)):
                problems.append(f"{where}: NaN throughout for {series['metric']}")
        numbers = [v for s in result for v in _values(s) if not math.isnan(v)]
        if must_have_data and not numbers:
            problems.append(f"{where}: no data")
    return problems


def _v2_body(image: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, *image.shape],
                        "data": image.ravel().tolist()}]}  # fmt: skip


def _traffic(srv: ThreadServer, images: list[bytes], raw: np.ndarray) -> dict[int, int]:
    """Mixed traffic, every kind of answer the dashboard and the alerts look at; the
    count of each status."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    url = srv.url

    def send(method: str, path: str, **kw: Any) -> None:
        r = httpx.request(method, url + path, timeout=60, **kw)
        with lock:
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    for i in range(6):
        send("POST", "/v1/classify", content=images[i], headers=PNG)
        send("POST", f"/v1/models/{R56}/classify", content=images[i], headers=PNG)
    files = [("file", (f"{i}.png", images[i], "image/png")) for i in range(4)]
    send("POST", f"/v1/models/{R20}/embed", files=files)
    send("POST", "/v1/embed?encoding=base64", content=images[0], headers=PNG)
    for i in range(3):
        send("POST", f"/v2/models/{R20}/infer", json=_v2_body(raw[i]))
    send("GET", "/v1/models")
    send("GET", f"/v2/models/{R56}")
    # Client errors: parameters, unknown model and path, undecodable image, wrong type.
    for _ in range(3):
        send("POST", "/v1/classify?top_k=0", content=images[0], headers=PNG)
    send("POST", "/v1/models/nope/classify", content=images[0], headers=PNG)
    send("GET", f"/v2/models/{R20}/config")
    send("POST", "/v1/classify", content=b"not an image", headers=PNG)
    send("POST", "/v1/classify", content=images[0], headers={"content-type": "text/plain"})
    # Two failed batches: 503 inference_failed; the session is recreated after each.
    model = srv.runtime.models[R20]
    fail_runs(model, 2)
    for i in range(2):
        send("POST", "/v1/classify", content=images[i], headers=PNG)
    # Saturation, then shedding: one image holds the only session, two requests of four
    # fill the admission limit (8) and wait; what comes next is refused with 503.
    entered, gate = hold_runs(model)
    waiting = [threading.Thread(target=send, args=("POST", "/v1/classify"),
                                kwargs={"content": images[0], "headers": PNG})]  # fmt: skip
    waiting[0].start()
    assert entered.wait(30), "the held run never started"
    for _ in range(2):
        t = threading.Thread(target=send, args=("POST", "/v1/classify"), kwargs={"files": files})
        t.start()
        waiting.append(t)
    wait_until(lambda: model.batcher is not None and model.batcher.pending == 8, timeout=30)
    time.sleep(3 * SCRAPE_S)  # scraped while full
    for _ in range(6):
        send("POST", f"/v1/models/{R20}/classify", files=files)
    gate.set()
    for t in waiting:
        t.join(60)
    # A model that loses its only session: 503, then not ready.
    retire_sessions(srv.runtime.models[R56])
    for _ in range(2):
        send("POST", f"/v1/models/{R56}/classify", content=images[0], headers=PNG)
    return statuses


@pytest.fixture
def served(cifar_repository: Path, tmp_path: Path) -> Iterator[ThreadServer]:
    repo = tmp_path / "repository"
    repo.mkdir()
    (repo / R20).symlink_to(cifar_repository / R20)
    _self_check_failing_copy(cifar_repository / R56, repo / R56)
    settings = Settings(
        repository=repo, models=[R20, R56], self_check="warn", max_queue_images=8,
        latency_slo_ms=0.5,  # every successful request is over it: the latency alert's data
    )  # fmt: skip
    srv = ThreadServer(settings).start()
    yield srv
    srv.stop()


def test_dashboard_and_rules_on_a_real_prometheus(
    served: ThreadServer, tmp_path: Path, cifar_test: dict[str, np.ndarray]
) -> None:
    binary("promtool")  # both or neither: one package
    started = time.monotonic()
    prom_port = free_port()
    config = _prometheus_config(served.port, free_port(), prom_port)
    prom = Prometheus(config, tmp_path, prom_port)
    try:
        _run_against(prom, served, cifar_test)
    except BaseException:
        print(prom.output())
        raise
    finally:
        prom.stop()
    # Bounded: well under the two minutes the issue allows for the whole test.
    assert time.monotonic() - started < 90


def _run_against(prom: Prometheus, srv: ThreadServer, cifar_test: dict[str, np.ndarray]) -> None:
    prom.wait_ready()

    # At rest: scraped a few times, recording rules evaluated, no inference request yet.
    def rested() -> bool:
        return bool(
            prom.api("query", query="model_status:resnet_serve_inference_requests:rate1m")["result"]
        )

    wait_until(rested, timeout=30, interval=0.5)
    rest_start = time.time()
    time.sleep(2 * SCRAPE_S)
    rest_end = time.time()
    up = prom.api("query", query='up{job="resnet-serve"}')["result"]
    assert sorted(float(s["value"][1]) for s in up) == [0.0, 1.0], up
    # The dashboard's model variable lists both models before any request.
    values = prom.api("label/model/values", **{"match[]": "resnet_serve_model_ready"})
    assert sorted(values) == [R20, R56]
    assert _check(prom, _expressions(), rest_start, rest_end, must_have_data=False) == []
    # The control: a ratio without its guard is NaN at rest, and is caught.
    unguarded = [("mean batch, unguarded", "sum(rate(resnet_serve_batch_size_sum[4s])) / "
                  "sum(rate(resnet_serve_batch_size_count[4s]))")]  # fmt: skip
    (found,) = _check(prom, unguarded, rest_start, rest_end, must_have_data=False)
    assert "NaN throughout" in found

    images = [png(img) for img in cifar_test["images"][:8]]
    traffic_start = time.time()
    statuses = _traffic(srv, images, cifar_test["images"])
    assert {200, 400, 404, 415, 422, 503} <= set(statuses), statuses

    # Every expression returns numbers once the traffic was scraped and the rules ran;
    # polled, as a busy machine may scrape late.
    problems: list[str] = []

    def evaluated() -> bool:
        nonlocal problems
        problems = _check(prom, _expressions(), traffic_start, time.time(), must_have_data=True)
        return not problems

    try:
        wait_until(evaluated, timeout=30, interval=1.0)
    except TimeoutError:
        pytest.fail("\n".join(problems))
    # The control: an expression the traffic cannot make is caught as giving no data.
    never = [("never", "resnet_serve_model_ready > 1")]
    assert _check(prom, never, traffic_start, time.time(), must_have_data=True) == [
        "never: no data"
    ]
