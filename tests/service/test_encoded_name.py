"""``M.encoded`` (service/v2_names.py): every model under a second V2 name whose one input is
encoded image files, BYTES dims [1], over HTTP and gRPC, on the model's own sessions."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from resnet_serve.service.v2_names import ENCODED_SUFFIX
from tests.service import tiny
from tests.service.servers import ThreadServer, free_port, metric_value, png, thread_server

ALIAS = tiny.NAME + ENCODED_SUFFIX
IMAGES = np.random.default_rng(5).integers(0, 256, (3, tiny.CROP, tiny.CROP, 3), np.uint8)
BLOBS = np.array([[png(i)] for i in IMAGES], dtype=np.object_)  # [N, 1]


@pytest.fixture(scope="module")
def srv(tiny_repository: Path) -> Iterator[ThreadServer]:
    with thread_server(tiny_repository, grpc_port=free_port()) as server:
        yield server


def _expected_logits() -> np.ndarray:
    return tiny.expected(IMAGES)["logits"]


def test_http_metadata_config_ready_and_stats(srv: ThreadServer) -> None:
    with httpx.Client(base_url=srv.url) as c:
        meta = c.get(f"/v2/models/{ALIAS}").json()
        base = c.get(f"/v2/models/{tiny.NAME}").json()
        assert meta["name"] == ALIAS
        assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1, 1]}]
        assert meta["outputs"] == base["outputs"]
        assert c.get(f"/v2/models/{ALIAS}/versions/1").json() == meta
        assert c.get(f"/v2/models/{ALIAS}/versions/2").status_code == 404
        config = c.get(f"/v2/models/{ALIAS}/config").json()
        assert config["name"] == ALIAS
        assert config["input"] == [{"name": "images", "data_type": "TYPE_STRING", "dims": [1]}]
        assert config["max_batch_size"] > 0
        assert c.get(f"/v2/models/{ALIAS}/ready").json() == {"name": ALIAS, "ready": True}
        (entry,) = c.get(f"/v2/models/{ALIAS}/stats").json()["model_stats"]
        assert entry["name"] == ALIAS
        # Not a model of its own: not in the index, nor in /v1, nor in the unnamed stats.
        index = c.post("/v2/repository/index", json={}).json()
        assert ALIAS not in {m["name"] for m in index}
        every = c.get("/v2/models/stats").json()["model_stats"]
        assert ALIAS not in {m["name"] for m in every}
        assert c.get(f"/v1/models/{ALIAS}").status_code == 404
        assert c.get(f"/v2/models/nope{ENCODED_SUFFIX}").status_code == 404


def test_http_infer_takes_encoded_files_only(srv: ThreadServer) -> None:
    client = triton_http.InferenceServerClient(srv.url.removeprefix("http://"))
    with httpx.Client(base_url=srv.url) as c:
        before = c.get(f"/v2/models/{ALIAS}/stats").json()["model_stats"][0]
    # [N, 1] binary, and [N] in JSON (each file as base64 text, as tritonclient sends it).
    text = np.array([base64.b64encode(b).decode() for b in BLOBS[:, 0]], dtype=np.object_)
    for blobs, binary in ((BLOBS, True), (text, False)):
        inp = triton_http.InferInput("images", list(blobs.shape), "BYTES")
        inp.set_data_from_numpy(blobs, binary_data=binary)
        result = client.infer(ALIAS, [inp])
        assert result.get_response()["model_name"] == ALIAS
        np.testing.assert_allclose(result.as_numpy("logits"), _expected_logits(), atol=1e-4)
    with httpx.Client(base_url=srv.url) as c:
        after = c.get(f"/v2/models/{ALIAS}/stats").json()["model_stats"][0]
        # The model's own counts, under the alias's name.
        base = c.get(f"/v2/models/{tiny.NAME}/stats").json()["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 2 * len(IMAGES)
    assert after["inference_count"] == base["inference_count"]
    uint8 = triton_http.InferInput("images", list(IMAGES.shape), "UINT8")
    uint8.set_data_from_numpy(IMAGES)
    with pytest.raises(InferenceServerException, match="encoded image files only"):
        client.infer(ALIAS, [uint8])
    # The model's own name still takes both.
    assert client.infer(tiny.NAME, [uint8]).as_numpy("logits").shape == (3, len(tiny.LABELS))


def test_grpc_metadata_config_and_infer(srv: ThreadServer) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.settings.grpc_port}")
    meta = client.get_model_metadata(ALIAS, as_json=True)
    assert meta["name"] == ALIAS
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": ["-1", "1"]}]
    config = client.get_model_config(ALIAS, as_json=True)["config"]
    assert config["input"] == [{"name": "images", "data_type": "TYPE_STRING", "dims": ["1"]}]
    assert client.is_model_ready(ALIAS)
    (entry,) = client.get_inference_statistics(ALIAS, as_json=True)["model_stats"]
    assert entry["name"] == ALIAS
    inp = grpcclient.InferInput("images", list(BLOBS.shape), "BYTES")
    inp.set_data_from_numpy(BLOBS)

    def counted() -> float:
        text = httpx.get(srv.url + "/metrics").text
        labels = {"endpoint": "grpc_infer", "model": tiny.NAME, "status": "200"}
        return metric_value(text, "resnet_serve_requests_total", **labels)

    before = counted()
    result = client.infer(ALIAS, [inp])
    assert result.get_response().model_name == ALIAS
    assert counted() == before + 1  # metrics label the alias's requests with the model
    np.testing.assert_allclose(result.as_numpy("logits"), _expected_logits(), atol=1e-4)
    uint8 = grpcclient.InferInput("images", list(IMAGES.shape), "UINT8")
    uint8.set_data_from_numpy(IMAGES)
    with pytest.raises(InferenceServerException, match="encoded image files only"):
        client.infer(ALIAS, [uint8])
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata(f"nope{ENCODED_SUFFIX}")
    assert "NOT_FOUND" in str(exc.value.status())
