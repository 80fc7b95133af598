"""What /metrics and the access log say: every answer counted with its status under a
bounded set of labels, every per-model series there from the start, the limits and the
live state beside them (saturation, session health), successful requests' latency apart."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from resnet_serve.service.app import create_app
from resnet_serve.service.docs import router as docs_router
from resnet_serve.service.metrics import GRPC_ENDPOINTS, INFERENCE_STATUSES, REJECT_REASONS
from resnet_serve.service.middleware import ENDPOINTS, endpoint_of
from resnet_serve.service.routes import router as health_router
from resnet_serve.service.settings import Settings
from resnet_serve.service.triton_http import router as triton_router
from resnet_serve.service.ui import router as ui_router
from resnet_serve.service.v1 import inference_router as v1_inference
from resnet_serve.service.v1 import router as v1_router
from resnet_serve.service.v2 import inference_router as v2_inference
from resnet_serve.service.v2 import router as v2_router
from tests.service import tiny
from tests.service.faults import hold_decoding, retire_sessions
from tests.service.servers import ProcessServer, ThreadServer, metric_value, wait_until

R20 = tiny.NAME
KEY = "metrics-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
PNG = {"content-type": "image/png", **AUTH}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    """The one sample with exactly these labels, or None."""
    return found.get((name, frozenset(labels.items())))


def scrape(url: str) -> Samples:
    return samples(httpx.get(url + "/metrics").text)


@pytest.fixture(scope="module")
def keyed(tiny_repository: Path) -> Iterator[ProcessServer]:
    """`resnet-serve` with API keys, a small body limit and the access log at info."""
    srv = ProcessServer(
        tiny_repository, api_keys=KEY, log_level="info", max_body_bytes="20000",
        max_images_per_request="3",
    ).start()  # fmt: skip
    yield srv
    assert srv.stop() == 0


def _access_lines(srv: ProcessServer) -> list[dict]:  # type: ignore[type-arg]
    lines = [json.loads(ln) for ln in srv.output().splitlines() if ln.startswith("{")]
    return [ln for ln in lines if ln.get("logger") == "service.access"]


def test_every_answer_is_counted_and_logged(keyed: ProcessServer, tiny_pngs) -> None:
    url = keyed.url
    before = scrape(url)
    logged_before = len(_access_lines(keyed))
    sent: list[tuple[str, str, int]] = []  # (endpoint, model, status) of each answer

    def expect(r: httpx.Response, endpoint: str, model: str, status: int) -> None:
        assert r.status_code == status, (r.request.url, r.text)
        sent.append((endpoint, model, status))

    with httpx.Client(timeout=30) as c:
        one = tiny_pngs[0]
        for _ in range(5):  # a query parameter refused: the default model's request
            expect(c.post(f"{url}/v1/classify?top_k=0", content=one, headers=PNG),
                   "classify", R20, 422)  # fmt: skip
        for _ in range(3):
            r = c.post(f"{url}/v1/models/{R20}/embed?encoding=bogus", content=one, headers=PNG)
            expect(r, "embed", R20, 422)
        expect(c.post(f"{url}/v1/classify", content=one, headers=PNG), "classify", R20, 200)
        # Unknown paths: one label value for all of them, however many different paths.
        for i in range(12):
            expect(c.get(f"{url}/v2/models/m{i}/trace/setting", headers=AUTH), "unknown", "", 404)
        expect(c.get(f"{url}/nope/{'x' * 300}", headers=AUTH), "unknown", "", 404)
        expect(c.post(f"{url}/v1/models/nope/classify", content=one, headers=PNG),
               "classify", "", 404)  # fmt: skip
        expect(c.get(f"{url}/v1/classify", headers=AUTH), "classify", "", 405)
        # 401 before any route runs; the model of the path when it is a served one.
        expect(c.post(f"{url}/v1/models/{R20}/classify", content=one), "classify", R20, 401)
        expect(c.post(f"{url}/v1/models/zz/embed", content=one, headers={"authorization": "x"}),
               "embed", "", 401)  # fmt: skip
        expect(c.get(f"{url}/nowhere"), "unknown", "", 401)
        # 413 from Content-Length, before the body is read; and too many images.
        big = b"\0" * 30_000
        expect(c.post(f"{url}/v1/classify", content=big, headers=PNG), "classify", R20, 413)
        files = [("file", (f"{i}.png", one, "image/png")) for i in range(4)]
        expect(c.post(f"{url}/v2/models/{R20}/infer", content=big, headers=AUTH),
               "v2_infer", R20, 413)  # fmt: skip
        expect(c.post(f"{url}/v1/embed", files=files, headers=AUTH), "embed", R20, 413)
        expect(c.get(f"{url}/openapi.json"), "docs", "", 200)
        expect(c.get(f"{url}/healthz"), "healthz", "", 200)  # counted, not logged
    after = scrape(url)

    expected: dict[tuple[str, str, int], int] = {}
    for key in sent:
        expected[key] = expected.get(key, 0) + 1
    for (endpoint, model, status), n in expected.items():
        labels = {"endpoint": endpoint, "model": model, "status": str(status)}
        got = (value(after, "resnet_serve_requests_total", **labels) or 0) - (
            value(before, "resnet_serve_requests_total", **labels) or 0
        )
        assert got == n, (labels, got, n)
    # Bounded: the endpoint label takes only the route table's values (and "unknown"); the
    # model label only served models (or "").
    endpoints = {dict(lab)["endpoint"] for (name, lab) in after if name.endswith("requests_total")}
    assert endpoints <= {*ENDPOINTS.values(), *GRPC_ENDPOINTS, "unknown"}, endpoints
    models = {dict(lab)["model"] for (name, lab) in after if name.endswith("requests_total")}
    assert models <= {R20, ""}, models

    # One access-log line per answer but the successful probe, with status and endpoint;
    # no key, no image bytes.
    wait_until(lambda: len(_access_lines(keyed)) - logged_before >= len(sent) - 1, timeout=10)
    lines = _access_lines(keyed)[logged_before:]
    got_lines = sorted((ln["endpoint"], ln["model"], ln["status"]) for ln in lines)
    assert got_lines == sorted(k for k in sent if k[0] != "healthz")
    assert all(ln["request_id"] and "duration_ms" in ln for ln in lines)
    assert max(len(ln["message"]) for ln in lines) < 300  # a long path is cut
    log = keyed.output()
    assert KEY not in log and "IHDR" not in log


def test_success_latency_is_apart_from_errors(keyed: ProcessServer, tiny_pngs) -> None:
    before = scrape(keyed.url)
    ok = httpx.post(f"{keyed.url}/v1/models/{R20}/classify", content=tiny_pngs[1], headers=PNG)
    bad = httpx.post(f"{keyed.url}/v1/models/{R20}/classify?top_k=-1", content=b"", headers=PNG)
    assert (ok.status_code, bad.status_code) == (200, 422)
    after = scrape(keyed.url)
    name = "resnet_serve_request_duration_seconds_count"
    for cls in ("2xx", "4xx"):
        labels = {"endpoint": "classify", "model": R20, "status_class": cls}
        assert (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0) == 1
    # Probes and scrapes are counted, not timed.
    assert not any(dict(lab).get("endpoint") == "metrics" for (n, lab) in after if n == name)


def test_endpoint_table_names_every_route() -> None:
    app = create_app(Settings())
    # Every route is the application's own, none inside an included router (whose route
    # table FastAPI re-checks on every request: service.routes.include).
    paths = [getattr(r, "path", None) for r in app.routes]
    assert all(isinstance(p, str) for p in paths), app.routes
    routers = (health_router, v1_inference, v1_router, v2_inference, v2_router, triton_router,
               docs_router, ui_router)  # fmt: skip
    assert {r.path for router in routers for r in router.routes} <= set(paths)  # type: ignore[attr-defined]
    assert set(paths) == set(ENDPOINTS), set(paths) ^ set(ENDPOINTS)
    assert endpoint_of("/v2/models/m/versions/1/infer") == ("v2_infer", "m")
    assert endpoint_of("/v1/models/a/b/classify") == ("unknown", None)  # one segment only


def test_every_model_series_exists_at_zero_and_limits_are_exported(
    tiny_repository: Path, tiny_pngs
) -> None:
    settings = Settings(repository=tiny_repository, max_queue_images=8, latency_slo_ms=250)
    srv = ThreadServer(settings).start()
    try:
        found = scrape(srv.url)
        m = {"model": R20}
        for endpoint, statuses in INFERENCE_STATUSES.items():
            assert value(found, "resnet_serve_images_total", endpoint=endpoint, **m) == 0
            for status in statuses:
                labels = {"endpoint": endpoint, "status": status, **m}
                assert value(found, "resnet_serve_requests_total", **labels) == 0, labels
            assert value(found, "resnet_serve_request_duration_seconds_count",
                         endpoint=endpoint, status_class="2xx", **m) == 0  # fmt: skip
        for reason in REJECT_REASONS:
            assert value(found, "resnet_serve_rejected_images_total", reason=reason, **m) == 0
        for name in ("inference_failures_total", "batch_padding_images_total",
                     "queue_wait_seconds_count", "preprocess_duration_seconds_count",
                     "inference_duration_seconds_count", "batch_size_count", "queue_depth",
                     "admitted_images"):  # fmt: skip
            assert value(found, f"resnet_serve_{name}", **m) == 0, name
        assert value(found, "resnet_serve_max_queue_images", **m) == 8
        assert value(found, "resnet_serve_max_batch_size", **m) == settings.max_batch_size
        assert value(found, "resnet_serve_sessions", **m) == 1
        assert value(found, "resnet_serve_sessions_healthy", **m) == 1
        assert value(found, "resnet_serve_model_ready", **m) == 1
        assert value(found, "resnet_serve_model_info", precision="fp32", **m) == 1
        assert value(found, "resnet_serve_latency_slo_seconds") == 0.25
        assert value(found, "resnet_serve_time_to_ready_seconds", **{}) > 0  # type: ignore[operator]
        (build,) = [dict(lab) for (n, lab) in found if n == "resnet_serve_build_info"]
        assert build["provider"] == "CPUExecutionProvider"
        assert build["version"] and build["onnxruntime"] and build["python"]
    finally:
        srv.stop()


def test_admitted_images_include_those_still_decoding(tiny_repository: Path, tiny_pngs) -> None:
    srv = ThreadServer(Settings(repository=tiny_repository)).start()
    gate = hold_decoding(srv.runtime)
    files = [("file", (f"{i}.png", tiny_pngs[i], "image/png")) for i in range(3)]
    answer: list[int] = []
    client = threading.Thread(
        target=lambda: answer.append(
            httpx.post(srv.url + "/v1/classify", files=files, timeout=30).status_code
        )
    )
    client.start()
    try:
        text = ""

        def decoding() -> bool:
            nonlocal text
            text = httpx.get(srv.url + "/metrics").text
            return metric_value(text, "resnet_serve_admitted_images") == 3

        wait_until(decoding, timeout=10)
        assert metric_value(text, "resnet_serve_queue_depth") == 0
    finally:
        gate.set()
        client.join(30)
    try:
        assert answer == [200]
        text = httpx.get(srv.url + "/metrics").text
        assert metric_value(text, "resnet_serve_admitted_images") == 0
    finally:
        srv.stop()


def test_a_retired_session_shows_in_session_health_and_readiness(
    tiny_repository: Path, tiny_pngs
) -> None:
    srv = ThreadServer(Settings(repository=tiny_repository)).start()
    retire_sessions(srv.runtime.models[R20])
    try:
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[0], headers=PNG)
        assert r.status_code == 503
        wait_until(lambda: value(scrape(srv.url), "resnet_serve_sessions_healthy", model=R20) == 0)
        found = scrape(srv.url)
        assert value(found, "resnet_serve_model_ready", model=R20) == 0
        assert value(found, "resnet_serve_sessions", model=R20) == 1
        assert value(found, "resnet_serve_inference_failures_total", model=R20) == 1
        labels = {"endpoint": "classify", "model": R20, "status": "503"}
        assert value(found, "resnet_serve_requests_total", **labels) == 1
        # Readiness answers are counted under their own endpoint, with their status.
        assert httpx.get(srv.url + "/readyz").status_code == 503
        found = scrape(srv.url)
        labels = {"endpoint": "readyz", "model": "", "status": "503"}
        assert value(found, "resnet_serve_requests_total", **labels) == 1
    finally:
        srv.stop()
