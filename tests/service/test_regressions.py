"""Regressions from the hardening issue, over real HTTP: each was a 500, a hang or a
wrong answer."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service.servers import ProcessServer, ThreadServer, thread_server, wait_until


@pytest.fixture(scope="module")
def srv(r20_repository: Path) -> Iterator[ThreadServer]:
    with thread_server(r20_repository) as server:
        yield server


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def test_thin_images_are_refused_before_resizing(srv, cifar_pngs) -> None:
    # 1x100000 (a few hundred bytes) resized to a shorter side of 32 is 32x3200000: it was
    # a 200 after seconds and 500 MiB; 1x40000000 (at the pixel limit) a MemoryError, a 500.
    for width, height in ((100_000, 1), (1, 40_000_000)):
        files = [("file", ("ok.png", cifar_pngs[0])), ("file", ("thin.png", _png(width, height)))]
        r = httpx.post(srv.url + "/v1/classify", files=files, timeout=60)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "payload_too_large"
        assert error["message"].startswith("image 1: ") and "once resized" in error["message"]
    # Thin but within the limit once resized: still served.
    files = [("file", ("thin.png", _png(1000, 10)))]
    assert httpx.post(srv.url + "/v1/classify", files=files, timeout=60).status_code == 200


@pytest.mark.parametrize("drain", ["0", "0.5"])
def test_drain_timeout_below_one_second_is_honoured(r20_repository, cifar_pngs, drain) -> None:
    # Regression: int(drain_timeout_s) or None made anything below 1 s "wait forever".
    server = ProcessServer(r20_repository, holdable=True, drain_timeout_s=drain).start()
    assert server.proc is not None
    statuses: list[int] = []

    def client() -> None:
        try:
            files = [("file", ("0.png", cifar_pngs[0]))]
            statuses.append(
                httpx.post(server.url + "/v1/classify", files=files, timeout=60).status_code
            )
        except httpx.TransportError:
            statuses.append(-1)

    server.hold()  # the request stays in its session until released (or 120 s)
    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(server.entered, timeout=60)
        server.proc.send_signal(signal.SIGTERM)
        # Exits while the request is still held: the drain did not wait for it.
        assert server.proc.wait(30) == 0
    finally:
        server.release()
        server.stop(signal.SIGKILL)
        thread.join(60)
    assert statuses and statuses[0] != 200


def test_cors_preflight_passes_without_a_key(r20_repository) -> None:
    # Regression: the preflight (never carries a key) was a 401 without CORS headers.
    origin = "https://app.example"
    with thread_server(r20_repository, api_keys=["k1"], cors_origins=[origin]) as server:
        preflight = {
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        }
        r = httpx.options(server.url + "/v1/classify", headers=preflight)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        # The request itself still needs the key; its 401 carries the CORS headers.
        r = httpx.post(server.url + "/v1/classify", headers={"origin": origin}, content=b"")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["access-control-allow-origin"] == origin
        # An OPTIONS that is not a preflight is no way around the key.
        r = httpx.options(server.url + "/v1/classify")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_weights_source_is_served_without_the_export_machines_path(
    cifar_repository, tmp_path
) -> None:
    # Regression: /v1/models showed where the exporting machine kept its checkpoint.
    model = tmp_path / "resnet20_cifar10"
    model.mkdir()
    exported = cifar_repository / "resnet20_cifar10"
    for item in exported.iterdir():
        if item.name != "model.json":
            (model / item.name).symlink_to(item)
    meta = json.loads((exported / "model.json").read_text())
    meta["weights"]["source"] = "/home/someone/checkpoints/model_4.pth#ema"
    (model / "model.json").write_text(json.dumps(meta))
    with thread_server(tmp_path) as server:
        listed = httpx.get(server.url + "/v1/models").json()["models"][0]
        one = httpx.get(server.url + "/v1/models/resnet20_cifar10").json()
    assert listed["weights"]["source"] == one["weights"]["source"] == "model_4.pth#ema"


def _invalid_parameter(r: httpx.Response) -> None:
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameter"


def test_integers_and_numbers_are_parsed_strictly(srv, cifar_pngs) -> None:
    image = base64.b64encode(cifar_pngs[0]).decode()
    url = srv.url + "/v1/classify"
    # JSON true and 1.0 were taken as top_k=1, "1_000" as 1000 ms.
    for top_k in (True, 1.0, "1.0"):
        _invalid_parameter(httpx.post(url, json={"images": [image], "top_k": top_k}))
    files = [("file", ("0.png", cifar_pngs[0]))]
    for top_k in ("1.0", "1_0", "true"):
        _invalid_parameter(httpx.post(url, files=files, params={"top_k": top_k}))
        _invalid_parameter(httpx.post(url, files=files, data={"top_k": top_k}))
    for header in ("1_000", "1e3", "nan", "-5"):
        _invalid_parameter(httpx.post(url, files=files, headers={"x-request-timeout-ms": header}))
    # What is right still is.
    r = httpx.post(
        url, files=files, params={"top_k": "2"}, headers={"x-request-timeout-ms": "5000.5"}
    )
    assert r.status_code == 200 and len(r.json()["results"][0]["predictions"]) == 2
    r = httpx.post(url, files=files, data={"top_k": "3"})
    assert r.status_code == 200 and len(r.json()["results"][0]["predictions"]) == 3
    r = httpx.post(url, json={"images": [image], "top_k": 1})
    assert r.status_code == 200 and len(r.json()["results"][0]["predictions"]) == 1


def test_one_answer_past_the_image_count_limit(srv, cifar_pngs) -> None:
    # 65 files were a 413, 66 and more a 400 "Too many files" from the multipart parser.
    limit = srv.settings.max_images_per_request
    for count in (limit + 1, limit + 2, limit + 50):
        files = [("file", (f"{i}.png", cifar_pngs[0])) for i in range(count)]
        r = httpx.post(srv.url + "/v1/classify", files=files, timeout=60)
        assert r.status_code == 413, (count, r.text)
        error = r.json()["error"]
        assert error["code"] == "payload_too_large" and f"limit is {limit}" in error["message"]


def test_gem_exponent_is_bounded(srv, cifar_pngs) -> None:
    # p=1e-300 made every x**p 1: a constant vector, whatever the image.
    files = [("file", ("0.png", cifar_pngs[0]))]
    for p in ("1e-300", "0.1", "21", "inf", "nan"):
        r = httpx.post(srv.url + "/v1/embed", files=files, params={"p": p})
        _invalid_parameter(r)
    image = base64.b64encode(cifar_pngs[0]).decode()
    r = httpx.post(srv.url + "/v1/embed", json={"images": [image], "p": 1e-300})
    _invalid_parameter(r)
