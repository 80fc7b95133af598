"""End-to-end over real HTTP against the `resnet-serve` process."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
from collections.abc import Iterator

import aiohttp
import httpx
import numpy as np
import pytest
from PIL import Image

from resnet_serve.service.app import create_app
from resnet_serve.service.settings import Settings
from resnet_serve.service.v1_schema import ClassifyParams, EmbedParams
from tests.service import tiny
from tests.service.servers import (
    ProcessServer,
    busy_server,
    encode,
    metric_value,
    png,
    wait_until,
)

# The acceptance tests (a real label, accuracy, what real images decode to) run on the CIFAR
# ResNet-20; the service's behaviour on the tiny model (tests/service/tiny.py) and a copy.
R20 = "resnet20_cifar10"
TINY, TINY2 = tiny.NAME, "tiny2"
C = tiny.CROP
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def server(tiny_pair_repository) -> Iterator[ProcessServer]:
    """`resnet-serve` on both tiny models; TINY is the default (listed first)."""
    srv = ProcessServer(tiny_pair_repository, models=f"{TINY},{TINY2}").start()
    yield srv
    assert srv.stop() == 0


def test_846_png_images_from_32_concurrent_clients(
    cifar_server: ProcessServer, cifar_pngs, cifar_test
):
    before = httpx.get(cifar_server.url + "/metrics").text

    # aiohttp rather than httpx here: httpx's per-request cost would make the client, not
    # the server, the bottleneck, and the server would never see concurrent requests.
    async def run() -> list[int]:
        todo = list(range(len(cifar_pngs)))
        preds = [-1] * len(cifar_pngs)
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(cifar_server.url, connector=connector) as client:

            async def worker() -> None:
                while todo:
                    i = todo.pop()
                    async with client.post(
                        "/v1/classify?top_k=1", data=cifar_pngs[i], headers=PNG
                    ) as r:
                        assert r.status == 200, await r.text()
                        body = await r.json()
                    preds[i] = body["results"][0]["predictions"][0]["index"]

            await asyncio.gather(*(worker() for _ in range(32)))
        return preds

    preds = np.array(asyncio.run(run()))
    accuracy = float((preds == cifar_test["labels"]).mean())
    assert accuracy >= 0.91, accuracy
    after = httpx.get(cifar_server.url + "/metrics").text
    count = metric_value(after, "resnet_serve_batch_size_count", model=R20) - metric_value(
        before, "resnet_serve_batch_size_count", model=R20
    )
    total = metric_value(after, "resnet_serve_batch_size_sum", model=R20) - metric_value(
        before, "resnet_serve_batch_size_sum", model=R20
    )
    assert count > 0 and total == len(cifar_pngs)  # each image ran once
    # How many batches they took depends on this machine's speed and cores: that the
    # service batches requests is shown, deterministically, by the test below.


def test_requests_queued_behind_a_busy_session_run_as_one_batch(
    server: ProcessServer, tiny_repository, tiny_pngs
) -> None:
    n = 8
    got: dict[int, httpx.Response] = {}
    with busy_server(tiny_repository, tiny_pngs[0]) as (srv, answers):
        assert srv.gate is not None

        def client(i: int) -> None:
            got[i] = httpx.post(
                srv.url + "/v1/classify", content=tiny_pngs[i], headers=PNG, timeout=60
            )

        clients = [threading.Thread(target=client, args=(i,)) for i in range(1, n + 1)]
        for c in clients:
            c.start()
        wait_until(
            lambda: (
                metric_value(httpx.get(srv.url + "/metrics").text, "resnet_serve_queue_depth") == n
            ),
            timeout=60,
        )
        srv.gate.set()  # all n wait in the queue: the session is free again
        for c in clients:
            c.join(60)
        registry = srv.runtime.metrics.registry
        batches = registry.get_sample_value("resnet_serve_batch_size_count", {"model": TINY})
        images = registry.get_sample_value("resnet_serve_batch_size_sum", {"model": TINY})
    assert answers[0].status_code == 200
    # The holder's batch, then one for the n requests that queued behind it.
    assert (batches, images) == (2, n + 1)
    # Each answer is its own image's, as the same image alone gets it.
    for i in range(1, n + 1):
        assert _top5(got[i]) == _top5(_raw(server, tiny_pngs[i])), i


def _classify(server: ProcessServer, path: str = "/v1/classify", **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(server.url + path, timeout=30, **kwargs)


def _raw(server: ProcessServer, data: bytes, ctype: str = "image/png", path: str = "/v1/classify"):  # type: ignore[no-untyped-def]
    return httpx.post(server.url + path, content=data, headers={"content-type": ctype}, timeout=30)


def _top1(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [r["predictions"][0]["index"] for r in response.json()["results"]]


def _top5(response: httpx.Response) -> list[list[int]]:
    assert response.status_code == 200, response.text
    return [[p["index"] for p in r["predictions"][:5]] for r in response.json()["results"]]


def test_input_forms_agree(cifar_server: ProcessServer, cifar_pngs, cifar_test) -> None:
    img = cifar_pngs[0]
    raw = _classify(cifar_server, content=img, headers=PNG)
    multipart = _classify(cifar_server, files={"file": ("a.png", img, "image/png")})
    as_json = _classify(cifar_server, json={"images": [base64.b64encode(img).decode()]})
    octet = _classify(
        cifar_server, content=img, headers={"content-type": "application/octet-stream"}
    )
    bodies = [r.json() for r in (raw, multipart, as_json, octet)]
    assert all(b == bodies[0] for b in bodies)
    body = bodies[0]
    assert body["model"] == R20
    (result,) = body["results"]
    preds = result["predictions"]
    assert len(preds) == 5  # default top_k
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    assert preds[0]["index"] == int(cifar_test["labels"][0])
    assert preds[0]["label"] == str(cifar_test["classes"][preds[0]["index"]])
    assert 0 < sum(p["score"] for p in preds) <= 1.0 + 1e-6


def test_top_k_query_and_body(server: ProcessServer, tiny_pngs) -> None:
    img = tiny_pngs[1]
    r = _classify(server, content=img, headers=PNG, params={"top_k": 2})
    assert len(r.json()["results"][0]["predictions"]) == 2
    r = _classify(server, json={"images": [base64.b64encode(img).decode()], "top_k": 3})
    assert len(r.json()["results"][0]["predictions"]) == 3
    r = _classify(server, files={"file": ("a.png", img)}, data={"top_k": "4"})
    assert len(r.json()["results"][0]["predictions"]) == 4
    r = _classify(server, json={"images": [base64.b64encode(img).decode()], "top_k": 1000})
    probs = [p["score"] for p in r.json()["results"][0]["predictions"]]
    assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=1e-6)


def test_many_images_keep_request_order(server: ProcessServer, tiny_pngs) -> None:
    # Each image's top-5 ranking: the tiny model's top-1 takes only a few values.
    order = [5, 0, 17, 3, 3, 42, 8, 1, 59, 23, 63, 7]
    singles = {i: _top5(_raw(server, tiny_pngs[i]))[0] for i in set(order)}
    files = [("file", (f"{i}.png", tiny_pngs[i], "image/png")) for i in order]
    assert _top5(_classify(server, files=files)) == [singles[i] for i in order]
    images = [base64.b64encode(tiny_pngs[i]).decode() for i in order]
    full = _classify(server, json={"images": images, "top_k": 10}).json()["results"]
    assert [[p["index"] for p in r["predictions"][:5]] for r in full] == [singles[i] for i in order]


def test_named_model_and_default(server: ProcessServer, tiny_pngs) -> None:
    r = _classify(server, f"/v1/models/{TINY2}/classify", files={"file": ("a", tiny_pngs[2])})
    assert r.status_code == 200 and r.json()["model"] == TINY2
    r = _classify(server, f"/v1/models/{TINY}/classify", files={"file": ("a", tiny_pngs[2])})
    assert r.json()["model"] == TINY


def test_default_model_option(tiny_pair_repository, tiny_pngs) -> None:
    # Without it, the default would be TINY: the repository's first by name.
    srv = ProcessServer(tiny_pair_repository, default_model=TINY2).start()
    try:
        listing = httpx.get(srv.url + "/v1/models").json()
        assert listing["default"] == TINY2
        assert {m["name"]: m["default"] for m in listing["models"]} == {
            TINY: False,
            TINY2: True,
        }
        files = {"file": ("a.png", tiny_pngs[0])}
        assert _classify(srv, files=files).json()["model"] == TINY2
        r = _classify(srv, "/v1/embed", files=files)
        assert r.json()["model"] == TINY2
        assert _classify(srv, f"/v1/models/{TINY}/classify", files=files).json()["model"] == TINY
    finally:
        assert srv.stop() == 0


def test_embeddings(server: ProcessServer, tiny_pngs) -> None:
    files = [("file", (f"{i}.png", tiny_pngs[i])) for i in range(3)]
    r = httpx.post(server.url + "/v1/embed", files=files, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == TINY and body["dim"] == tiny.DIM
    emb = np.array(body["embeddings"], dtype=np.float64)
    assert emb.shape == (3, tiny.DIM)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    raw = httpx.post(
        server.url + f"/v1/models/{TINY}/embed", files=files, params={"normalize": "false"}
    ).json()
    raw_emb = np.array(raw["embeddings"])
    assert not np.allclose(np.linalg.norm(raw_emb, axis=1), 1.0)
    np.testing.assert_allclose(
        raw_emb / np.linalg.norm(raw_emb, axis=1, keepdims=True), emb, atol=1e-5
    )
    b64 = httpx.post(server.url + "/v1/embed", files=files, params={"encoding": "base64"}).json()
    assert b64["encoding"] == "base64"
    decoded = np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in b64["embeddings"]])
    np.testing.assert_array_equal(decoded, emb.astype(np.float32))


def test_listing_and_metadata(cifar_server: ProcessServer) -> None:
    body = httpx.get(cifar_server.url + "/v1/models").json()
    assert body["default"] == R20  # the first of --models
    listing = body["models"]
    assert [m["name"] for m in listing] == [R20, "resnet56_cifar10"]
    assert listing[0]["default"] is True and listing[1]["default"] is False
    assert all("labels" not in m and m["ready"] for m in listing)
    assert listing[0]["embedding_dim"] == 64 and listing[0]["preprocess"]["crop"] == 32
    meta = httpx.get(cifar_server.url + f"/v1/models/{R20}").json()
    assert len(meta["labels"]) == 10 and meta["labels"][3] == "cat"


def test_health_and_metrics(server: ProcessServer) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "resnet_serve_requests_total",
        "resnet_serve_request_duration_seconds_bucket",
        "resnet_serve_queue_wait_seconds_bucket",
        "resnet_serve_preprocess_duration_seconds_bucket",
        "resnet_serve_inference_duration_seconds_bucket",
        "resnet_serve_batch_size_bucket",
        "resnet_serve_queue_depth",
        "resnet_serve_images_total",
    ):
        assert f"\n{name}" in text, name
    assert 'le="16.0"' in text and 'le="32.0"' in text  # power-of-two batch buckets
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/models/{model}/classify" in spec["paths"]


def test_pages_come_from_the_installed_package(server: ProcessServer) -> None:
    # Was: the pages' files were looked up as the top-level package ``service``, which
    # only a process started from the checkout's root could import: every page was a 500
    # under the installed `resnet-serve` script.
    for path in ("/", "/ui", "/docs", "/redoc", "/static/swagger-ui.css"):
        r = httpx.get(server.url + path, timeout=30)
        assert r.status_code == 200, (path, r.status_code)
        assert r.content


def test_request_id(server: ProcessServer, tiny_pngs) -> None:
    r = httpx.get(server.url + "/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(server.url + "/healthz").headers["x-request-id"]) == 32


# --- errors: the JSON shape, the status, the message ---


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    return body["error"]["message"]


def test_400_names_the_bad_image(server: ProcessServer, tiny_pngs) -> None:
    files = [("file", ("ok.png", tiny_pngs[0])), ("file", ("bad.png", b"definitely not an image"))]
    msg = _error(_classify(server, files=files), 400, "invalid_image")
    assert "image 1" in msg
    truncated = tiny_pngs[0][: len(tiny_pngs[0]) // 2]
    assert "image 0" in _error(_raw(server, truncated), 400, "invalid_image")
    _error(_classify(server, json={"images": ["%%%not base64"]}), 400, "invalid_image")
    _error(_raw(server, b"{not json", "application/json"), 400, "bad_request")
    _error(_raw(server, b""), 400, "invalid_image")


def test_404_unknown_model(server: ProcessServer, tiny_pngs) -> None:
    msg = _error(
        _classify(server, "/v1/models/nope/classify", files={"file": ("a", tiny_pngs[0])}),
        404,
        "model_not_found",
    )
    assert TINY in msg
    _error(httpx.get(server.url + "/v1/models/nope"), 404, "model_not_found")
    _error(httpx.get(server.url + "/no/such/path"), 404, "not_found")


def test_413_limits(tiny_repository, tiny_pngs) -> None:
    srv = ProcessServer(
        tiny_repository, max_body_bytes="20000", max_images_per_request="3", max_image_pixels="4096"
    ).start()
    try:
        big = encode(np.zeros((100, 100, 3), np.uint8), "PNG")
        _error(_raw(srv, b"x" * 25000), 413, "payload_too_large")
        # Chunked, no Content-Length: the 413 comes once the limit is passed, while the
        # client is still sending, so the server never buffers the whole body.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(8):  # 32 KiB of an announced-unbounded body
                sock.sendall(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        files = [("file", (f"{i}.png", tiny_pngs[i])) for i in range(4)]
        assert "limit is 3" in _error(
            httpx.post(srv.url + "/v1/classify", files=files), 413, "payload_too_large"
        )
        assert "image 0" in _error(_raw(srv, big), 413, "payload_too_large")
    finally:
        assert srv.stop() == 0


def test_415_unsupported(server: ProcessServer) -> None:
    _error(_raw(server, b"hello", "text/plain"), 415, "unsupported_media_type")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "ICO")
    msg = _error(_raw(server, buf.getvalue(), "image/x-icon"), 415, "unsupported_media_type")
    assert "ICO" in msg


@pytest.mark.parametrize(
    ("params", "json_extra"),
    [({"top_k": 0}, {}), ({"top_k": "abc"}, {}), ({}, {"top_k": -1}), ({}, {"unknown": 1})],
)
def test_422_invalid_parameters(server: ProcessServer, tiny_pngs, params, json_extra) -> None:
    body = {"images": [base64.b64encode(tiny_pngs[0]).decode()], **json_extra}
    _error(_classify(server, params=params, json=body), 422, "invalid_parameter")


def test_422_bad_embed_encoding_and_empty_request(server: ProcessServer, tiny_pngs) -> None:
    r = httpx.post(
        server.url + "/v1/embed", params={"encoding": "hex"}, files={"file": ("a", tiny_pngs[0])}
    )
    _error(r, 422, "invalid_parameter")
    _error(_classify(server, json={"images": []}), 422, "invalid_parameter")
    _error(_classify(server, json={"pictures": []}), 422, "invalid_parameter")


def test_query_parameters_are_read_by_the_route_as_written(
    server: ProcessServer, tiny_pngs
) -> None:
    """The inference routes read their query themselves (FastAPI's parameter resolution is
    skipped): strictly as written, the last of a repeated one, unknown ones ignored."""
    one = {"content": tiny_pngs[0], "headers": PNG}
    r = httpx.post(server.url + "/v1/classify?top_k=1&top_k=3&unknown=x", **one)
    assert r.status_code == 200 and len(r.json()["results"][0]["predictions"]) == 3
    for query in ("top_k=1.0", "top_k=", "top_k=1_0"):
        _error(httpx.post(f"{server.url}/v1/classify?{query}", **one), 422, "invalid_parameter")
    embed = server.url + "/v1/embed"
    for query, named in (("p=abc", "p:"), ("normalize=maybe", "normalize:"),
                         ("pool=median", "pool:"), ("pool=gem&p=0.1", "p:")):  # fmt: skip
        msg = _error(httpx.post(f"{embed}?{query}", **one), 422, "invalid_parameter")
        assert msg.startswith("query." + named), msg
    # A bad query value is refused even where the body's own value would win.
    b64 = base64.b64encode(tiny_pngs[0]).decode()
    r = httpx.post(server.url + "/v1/classify?top_k=0", json={"images": [b64], "top_k": 2})
    assert _error(r, 422, "invalid_parameter").startswith("query.top_k:")
    r = httpx.post(server.url + "/v1/classify?top_k=1", json={"images": [b64], "top_k": 2})
    assert len(r.json()["results"][0]["predictions"]) == 2
    r = httpx.post(server.url + "/v1/classify?top_k=1", json={"images": [b64], "top_k": 0})
    assert _error(r, 422, "invalid_parameter").startswith("top_k:")
    plain = httpx.post(f"{embed}?normalize=false&encoding=base64", **one).json()
    assert plain["encoding"] == "base64" and plain["dim"] > 0
    # The model is resolved first: an unknown one is a 404 whatever its query.
    r = httpx.post(f"{server.url}/v1/models/nope/classify?top_k=0", **one)
    _error(r, 404, "model_not_found")


def test_the_documented_query_parameters_are_the_validated_ones() -> None:
    """The OpenAPI schema documents the inference routes' query parameters from functions
    the routes never call: they must name exactly what the routes validate."""
    spec = create_app(Settings()).openapi()["paths"]
    for path, fields in (
        ("/v1/classify", ClassifyParams.model_fields),
        ("/v1/models/{model}/classify", ClassifyParams.model_fields),
        ("/v1/embed", EmbedParams.model_fields),
        ("/v1/models/{model}/embed", EmbedParams.model_fields),
    ):
        documented = {p["name"] for p in spec[path]["post"]["parameters"] if p["in"] == "query"}
        assert documented == set(fields), path
        defaults = {
            p["name"]: p["schema"].get("default")
            for p in spec[path]["post"]["parameters"]
            if p["in"] == "query"
        }
        assert defaults == {name: f.default for name, f in fields.items()}, path


def test_413_when_a_request_could_never_fit_the_queue(tiny_repository, tiny_pngs) -> None:
    srv = ProcessServer(tiny_repository, max_queue_images="2").start()
    try:
        files = [("file", (f"{i}.png", tiny_pngs[i])) for i in range(3)]
        r = httpx.post(srv.url + "/v1/classify", files=files)
        message = _error(r, 413, "payload_too_large")
        assert "3 images" in message and "at most 2" in message and "--max-queue-images" in message
        assert "retry-after" not in r.headers  # retrying cannot help
        v2 = {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [3, C, C, 3],
                    "data": [0] * (3 * C * C * 3),
                }
            ]
        }
        r = httpx.post(srv.url + f"/v2/models/{TINY}/infer", json=v2)
        assert r.status_code == 413 and "at most 2" in r.json()["error"]
        assert httpx.post(srv.url + "/v1/classify", files=files[:2]).status_code == 200
    finally:
        assert srv.stop() == 0


def test_503_when_the_queue_is_full_for_now(tiny_repository, tiny_pngs) -> None:
    with busy_server(tiny_repository, tiny_pngs[0], max_queue_images=2) as (srv, answers):
        files = [("file", (f"{i}.png", tiny_pngs[i])) for i in range(2)]
        queued = threading.Thread(
            target=lambda: answers.append(
                httpx.post(srv.url + "/v1/classify", files=files, timeout=60)
            )
        )
        queued.start()
        wait_until(
            lambda: (
                metric_value(httpx.get(srv.url + "/metrics").text, "resnet_serve_queue_depth") == 2
            ),
            timeout=60,
        )
        r = httpx.post(srv.url + "/v1/classify", files=files[:1], timeout=60)
        _error(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
    queued.join(30)
    assert [a.status_code for a in answers] == [200, 200]


def test_other_formats_and_modes(cifar_server: ProcessServer, cifar_test) -> None:
    img = cifar_test["images"][0]
    expected = _top1(_raw(cifar_server, png(img)))
    for fmt in ("BMP", "TIFF", "WEBP"):
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        got = _top1(_raw(cifar_server, encode(img, fmt, **kwargs), "image/*"))
        assert got == expected, fmt
    jpeg = _raw(cifar_server, encode(img, "JPEG", quality=95), "image/jpeg")
    assert jpeg.status_code == 200
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    assert _top1(_raw(cifar_server, buf.getvalue())) == expected
