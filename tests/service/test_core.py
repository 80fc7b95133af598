"""One inference core behind every protocol, on the tiny onnx.helper model (no torch):
/v1 and V2 give the answers the graph computes, errors come from one table in each
protocol's shape, and admission never leaks whatever way a request ends."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from resnet_serve.service.errors import TABLE, InvalidParameterError, answer
from tests.service import tiny
from tests.service.servers import ThreadServer, png, thread_server

RNG = np.random.default_rng(7)
IMAGES = RNG.integers(0, 256, size=(5, tiny.CROP, tiny.CROP, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def srv(tiny_repository: Path) -> Iterator[ThreadServer]:
    with thread_server(tiny_repository, max_images_per_request=8) as server:
        yield server


def _pending(srv: ThreadServer) -> int:
    return srv.runtime.models[tiny.NAME].batcher.pending  # type: ignore[union-attr]


def test_v1_classify_and_embed_are_what_the_graph_computes(srv: ThreadServer) -> None:
    want = tiny.expected(IMAGES)
    files = [("file", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(IMAGES)]
    r = httpx.post(f"{srv.url}/v1/classify?top_k=3", files=files)
    assert r.status_code == 200, r.text
    got = [res["predictions"] for res in r.json()["results"]]
    for preds, logits in zip(got, want["logits"], strict=True):
        order = np.argsort(-logits, kind="stable")[:3]
        assert [p["index"] for p in preds] == order.tolist()
        assert [p["label"] for p in preds] == [tiny.LABELS[i] for i in order]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert [p["score"] for p in preds] == pytest.approx(probs[order].tolist(), abs=1e-5)
    r = httpx.post(f"{srv.url}/v1/embed", files=files)
    vectors = np.array(r.json()["embeddings"])
    norm = want["embedding"] / np.linalg.norm(want["embedding"], axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, norm, atol=1e-5)
    # A stage map pooled by the core: GeM with p=1 is the average.
    r = httpx.post(f"{srv.url}/v1/embed?layer=layer1&pool=max&normalize=false", files=files)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        np.array(r.json()["embeddings"]), want["layer1"].max(axis=(2, 3)), atol=1e-6
    )


def test_v2_json_and_binary_match_v1(srv: ThreadServer) -> None:
    want = tiny.expected(IMAGES)
    body = {
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": list(IMAGES.shape),
             "data": IMAGES.ravel().tolist()}
        ],
        "outputs": [{"name": "logits"}, {"name": "embedding"},
                    {"name": "probabilities", "parameters": {"classification": 1}}],
    }  # fmt: skip
    r = httpx.post(f"{srv.url}/v2/models/{tiny.NAME}/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_allclose(
        np.array(out["logits"]["data"]).reshape(5, 10), want["logits"], atol=1e-5
    )
    np.testing.assert_allclose(
        np.array(out["embedding"]["data"]).reshape(5, tiny.DIM), want["embedding"], atol=1e-6
    )
    top1 = [int(item.split(":")[1]) for item in out["probabilities"]["data"]]
    assert top1 == want["logits"].argmax(axis=1).tolist()


@pytest.mark.parametrize(
    ("path", "protocol"),
    [("/v1/classify", "v1"), (f"/v2/models/{tiny.NAME}/infer", "v2")],
)
def test_one_error_table_each_protocol_its_shape(
    srv: ThreadServer, path: str, protocol: str
) -> None:
    # An invalid X-Request-Timeout-Ms: /v1's 422, the protocol's 400; the same message.
    headers = {"x-request-timeout-ms": "1_000", "content-type": "image/png"}
    content = png(IMAGES[0])
    if protocol == "v2":
        headers["content-type"] = "application/json"
        content = b"{}"
    r = httpx.post(srv.url + path, content=content, headers=headers)
    row = answer(InvalidParameterError("x"))
    if protocol == "v1":
        assert r.status_code == row.http == 422
        assert r.json()["error"]["code"] == row.code
        message = r.json()["error"]["message"]
    else:
        assert r.status_code == row.v2_http == 400
        message = r.json()["error"]
    assert "X-Request-Timeout-Ms" in message
    assert _pending(srv) == 0


def test_every_error_has_a_row_with_a_grpc_code() -> None:
    import grpc

    for cls, row in TABLE.items():
        assert 400 <= row.http < 600 and 400 <= row.v2_http < 600, cls
        assert isinstance(getattr(grpc.StatusCode, row.grpc), grpc.StatusCode), cls


def test_admission_never_leaks(srv: ThreadServer) -> None:
    """Whatever way a request ends (a bad image among good ones, bad parameters, too
    many images, a stage with pooling that does not apply, success), nothing stays
    admitted and nothing stays announced."""
    good = png(IMAGES[0])
    with httpx.Client(base_url=srv.url) as c:
        files = [("file", ("a.png", good, "image/png")), ("file", ("b.png", b"junk", "image/png"))]
        assert c.post("/v1/classify", files=files).status_code == 400
        assert c.post("/v1/classify?top_k=0", content=good,
                      headers={"content-type": "image/png"}).status_code == 422  # fmt: skip
        many = [("file", (f"{i}.png", good, "image/png")) for i in range(9)]
        assert c.post("/v1/classify", files=many).status_code == 413
        r = c.post("/v1/embed?layer=logits&pool=avg", content=good,
                   headers={"content-type": "image/png"})  # fmt: skip
        assert r.status_code == 422, r.text
        b64 = base64.b64encode(good).decode()
        assert c.post("/v1/classify", json={"images": [b64]}).status_code == 200
    assert _pending(srv) == 0
    assert srv.runtime.models[tiny.NAME].batcher.announced == 0  # type: ignore[union-attr]
