"""Stage features over HTTP: /v1 embed with layer and pool, .npy answers, V2 outputs."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import WEIGHTS_HOME
from tests.service.servers import ProcessServer

NPY = "application/x-npy"
MODEL = "r20feat"


@pytest.fixture(scope="module")
def feature_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    pytest.importorskip("torch")
    from resnet_serve.models.catalog import get_variant
    from resnet_serve.models.export import export_variant
    from resnet_serve.models.weights import resolve

    repo = tmp_path_factory.mktemp("features")
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(WEIGHTS_HOME)
    try:
        variant = get_variant("resnet20_cifar10")
        export_variant(variant, resolve(variant, "default"), repo, name=MODEL,
                       features=("layer1", "layer2", "layer3"))  # fmt: skip
    finally:
        os.environ.pop("TORCH_HOME") if old is None else os.environ.__setitem__("TORCH_HOME", old)
    # A small JSON limit: two of layer1's maps (16x32x32 floats each) go out as .npy.
    srv = ProcessServer(repo, json_max_floats="30000").start()
    yield srv
    assert srv.stop() == 0


def _embed(srv: ProcessServer, files, headers=None, **params) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(
        srv.url + "/v1/embed", files=files, params=params, headers=headers, timeout=30
    )


def _files(cifar_pngs: list[bytes], n: int = 3) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (f"{i}.png", cifar_pngs[i])) for i in range(n)]


def test_layer3_average_is_the_embedding(feature_server, cifar_pngs) -> None:
    files = _files(cifar_pngs)
    default = np.array(_embed(feature_server, files).json()["embeddings"])
    r = _embed(feature_server, files, layer="layer3", pool="avg")
    assert r.status_code == 200 and r.json()["layer"] == "layer3" and r.json()["dim"] == 64
    np.testing.assert_allclose(np.array(r.json()["embeddings"]), default, atol=1e-5)


def test_pooled_variants_equal_numpy_pooling_of_the_map(feature_server, cifar_pngs) -> None:
    files = _files(cifar_pngs)
    r = _embed(feature_server, files, layer="layer2", pool="none")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["shape"] == [32, 16, 16]
    maps = np.array(body["embeddings"], dtype=np.float32).reshape(3, 32, 16, 16)
    npy = _embed(feature_server, files, {"accept": NPY}, layer="layer2", pool="none")
    assert npy.headers["content-type"] == NPY
    from_npy = np.load(io.BytesIO(npy.content))
    assert from_npy.shape == (3, 32, 16, 16) and from_npy.dtype == np.float32
    np.testing.assert_array_equal(from_npy, maps)
    pooled = {
        "avg": maps.mean(axis=(2, 3)),
        "max": maps.max(axis=(2, 3)),
        "gem": np.power(np.power(np.clip(maps, 1e-6, None), 4.0).mean(axis=(2, 3)), 1 / 4.0),
    }
    for how, ref in pooled.items():
        raw = _embed(feature_server, files, layer="layer2", pool=how, p=4.0, normalize="false")
        np.testing.assert_allclose(np.array(raw.json()["embeddings"]), ref, rtol=1e-4, atol=1e-6)
        unit = np.array(
            _embed(feature_server, files, layer="layer2", pool=how).json()["embeddings"]
        )
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_large_maps_come_as_npy(feature_server, cifar_pngs) -> None:
    r = _embed(feature_server, _files(cifar_pngs, 2), layer="layer1", pool="none")
    assert r.status_code == 200 and r.headers["content-type"] == NPY
    assert np.load(io.BytesIO(r.content)).shape == (2, 16, 32, 32)


def test_any_answer_as_npy(feature_server, cifar_pngs) -> None:
    files = _files(cifar_pngs)
    r = httpx.post(feature_server.url + "/v1/classify", files=files, headers={"accept": NPY})
    logits = np.load(io.BytesIO(r.content))
    assert logits.shape == (3, 10)
    top1 = httpx.post(feature_server.url + "/v1/classify", files=files).json()["results"]
    assert list(logits.argmax(1)) == [res["predictions"][0]["index"] for res in top1]
    emb = np.load(io.BytesIO(_embed(feature_server, files, {"accept": NPY}).content))
    assert emb.shape == (3, 64)


def test_feature_parameter_errors(feature_server, cifar_pngs) -> None:
    files = _files(cifar_pngs, 1)
    for params in ({"layer": "layer4"}, {"pool": "max"}, {"layer": "layer2", "pool": "mean"},
                   {"layer": "layer2", "pool": "gem", "p": 0}):  # fmt: skip
        r = _embed(feature_server, files, **params)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["error"]["code"] == "invalid_parameter"


def test_v2_exposes_stage_outputs(feature_server, cifar_pngs) -> None:
    meta = httpx.get(feature_server.url + f"/v2/models/{MODEL}").json()
    outputs = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert outputs["layer2"] == [-1, 32, 16, 16] and outputs["layer3"] == [-1, 64, 8, 8]
    image = base64.b64encode(cifar_pngs[0]).decode()
    request = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [image]}],
        "outputs": [{"name": "layer3"}, {"name": "embedding"}],
    }
    r = httpx.post(feature_server.url + f"/v2/models/{MODEL}/infer", json=request)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["layer3"]["shape"] == [1, 64, 8, 8] and out["layer3"]["datatype"] == "FP32"
    layer3 = np.array(out["layer3"]["data"], dtype=np.float32).reshape(1, 64, 8, 8)
    np.testing.assert_allclose(
        layer3.mean(axis=(2, 3)), np.array([out["embedding"]["data"]]), atol=1e-5
    )


def test_model_json_lists_features(feature_server) -> None:
    meta = httpx.get(feature_server.url + f"/v1/models/{MODEL}").json()
    assert [(f["name"], f["channels"], f["stride"]) for f in meta["features"]] == [
        ("layer1", 16, 1), ("layer2", 32, 2), ("layer3", 64, 4),
    ]  # fmt: skip


def test_pooling_the_logits_is_a_422(feature_server, cifar_pngs) -> None:
    # Regression: a pool over the logits (a vector, no positions) was an AxisError, a 500.
    files = _files(cifar_pngs, 1)
    for pool in ("avg", "max", "gem"):
        r = _embed(feature_server, files, layer="logits", pool=pool)
        assert r.status_code == 422, (pool, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_parameter" and "not a feature map" in error["message"]
    image = base64.b64encode(cifar_pngs[0]).decode()
    r = httpx.post(
        feature_server.url + "/v1/embed",
        json={"images": [image], "layer": "logits", "pool": "gem"},
        timeout=30,
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"
    r = _embed(feature_server, files, layer="logits", pool="none", normalize="false")
    assert r.status_code == 200 and r.json()["dim"] == 10


def test_v2_classification_of_a_stage_is_a_400(feature_server, cifar_pngs) -> None:
    # Regression: classification on a [N, C, H, W] map was a TypeError, a 500.
    image = base64.b64encode(cifar_pngs[0]).decode()
    request = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [image]}],
        "outputs": [{"name": "layer2", "parameters": {"classification": 3}}],
    }
    r = httpx.post(feature_server.url + f"/v2/models/{MODEL}/infer", json=request, timeout=30)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and "'classification'" in r.json()["error"]
