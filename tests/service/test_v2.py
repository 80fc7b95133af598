"""The Open Inference Protocol (KServe V2) endpoints, driven by NVIDIA's own client,
``tritonclient.http``, in binary and JSON modes, and by hand where the wire format itself
is the point."""

from __future__ import annotations

import base64
import gzip
import io
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.utils import InferenceServerException

from resnet_serve.contract.schema import ModelSpec, PreprocessSpec, load_model_spec
from resnet_serve.service.errors import ServeError, answer
from resnet_serve.service.postprocess import softmax
from resnet_serve.service.v2_codec import parse_request
from tests.service import tiny
from tests.service.servers import ProcessServer, encode, metric_value, thread_server

# The tiny model (tests/service/tiny.py) and a second copy of it under another name.
R20, R56 = tiny.NAME, "tiny2"
N = 8
C = tiny.CROP  # the input's height and width
PIXELS = C * C * 3
HEADER = "Inference-Header-Content-Length"
# Triton's classification strings: "<value, six decimals>:<index>[:<label>]".
CLASS = re.compile(r"^(-?\d+\.\d{6}):(\d+)(?::(.+))?$")


@pytest.fixture(scope="module")
def client(server: ProcessServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def repository(tiny_pair_repository: Path) -> Path:
    return tiny_pair_repository


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ProcessServer]:
    """`resnet-serve` on both models; R20 is the default (listed first)."""
    srv = ProcessServer(repository, models=f"{R20},{R56}").start()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def images(tiny_images: np.ndarray) -> np.ndarray:
    """The first images as the model takes them: uint8 [N, C, C, 3]."""
    return tiny_images[:N]


@pytest.fixture(scope="module")
def reference(repository: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """logits and embedding from the exported model itself, no server involved."""
    session = ort.InferenceSession(
        str(repository / R20 / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    logits, embedding = session.run(["logits", "embedding"], {"images": images})
    return {"logits": logits, "probabilities": softmax(logits), "embedding": embedding}


def _uint8(images: np.ndarray, binary: bool) -> triton.InferInput:
    inp = triton.InferInput("images", list(images.shape), "UINT8")
    return inp.set_data_from_numpy(images, binary_data=binary)


def _bytes(items: list[bytes], binary: bool) -> triton.InferInput:
    inp = triton.InferInput("images", [len(items)], "BYTES")
    return inp.set_data_from_numpy(np.array(items, dtype=np.object_), binary_data=binary)


def _classes(strings: np.ndarray) -> list[list[tuple[float, int, str | None]]]:
    """Rows of (value, index, label) from a classification output, whichever mode."""
    rows = []
    for row in strings:
        parsed = []
        for s in row:
            m = CLASS.match(s.decode() if isinstance(s, bytes) else s)
            assert m, s
            parsed.append((float(m.group(1)), int(m.group(2)), m.group(3)))
        rows.append(parsed)
    return rows


# --- health and metadata ---


def test_server_metadata_and_health(client: triton.InferenceServerClient, server) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "resnet-serve" and meta["version"]
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v2", "/v2/health/ready", "/v2/models/{model}/ready"} <= set(paths)


def test_model_metadata_and_readiness(client: triton.InferenceServerClient, repository):
    for name in (R20, R56):
        spec = load_model_spec(repository / name)
        expected = {
            "name": name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, C, C, 3]}],
            "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                {"name": "embedding", "datatype": "FP32", "shape": [-1, spec.embedding_dim]},
                # The tiny model's stage map, as an export with --features lists it.
                {"name": "layer1", "datatype": "FP32", "shape": [-1, 3, C, C]},
            ],
        }
        assert client.get_model_metadata(name) == expected
        assert client.get_model_metadata(name, "1") == expected
        assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    assert not client.is_model_ready(R20, "2")
    assert not client.is_model_ready("nope")


# --- inference ---


def test_uint8_input_binary_and_json_give_the_models_outputs(
    client: triton.InferenceServerClient, images: np.ndarray, reference: dict[str, np.ndarray]
) -> None:
    got: dict[bool, dict[str, np.ndarray]] = {}
    for binary in (True, False):
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in reference]
        r = client.infer(R20, [_uint8(images, binary)], outputs=outputs, request_id="req-7")
        head = r.get_response()
        assert (head["id"], head["model_name"], head["model_version"]) == ("req-7", R20, "1")
        for name, want in reference.items():
            out = r.get_output(name)
            assert out["datatype"] == "FP32" and out["shape"] == list(want.shape)
            if binary:
                assert out["parameters"]["binary_data_size"] == want.size * 4
            else:
                assert "data" in out and "parameters" not in out
        got[binary] = {name: r.as_numpy(name) for name in reference}
    for name, want in reference.items():
        np.testing.assert_allclose(got[True][name], want, rtol=1e-5, atol=1e-5, err_msg=name)
        # JSON carries float32 exactly: both modes give the very same numbers.
        np.testing.assert_array_equal(got[True][name], got[False][name], err_msg=name)
    assert (got[True]["logits"].argmax(1) == reference["logits"].argmax(1)).all()


def test_bytes_input_matches_v1(
    client: triton.InferenceServerClient,
    server: ProcessServer,
    tiny_pngs: list[bytes],
    reference: dict[str, np.ndarray],
) -> None:
    pngs = tiny_pngs[:N]
    files = [("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    v1 = httpx.post(server.url + "/v1/classify?top_k=1", files=files, timeout=30).json()
    v1_top1 = [(r["predictions"][0]["index"], r["predictions"][0]["label"]) for r in v1["results"]]
    v1_emb = httpx.post(server.url + "/v1/embed?normalize=false", files=files, timeout=30).json()
    classes = tiny.LABELS
    answers = []
    for binary in (True, False):
        # JSON cannot carry raw bytes: there each element is the file in base64.
        items = pngs if binary else [base64.b64encode(p) for p in pngs]
        outputs = [
            triton.InferRequestedOutput("logits", binary_data=binary, class_count=3),
            triton.InferRequestedOutput("embedding", binary_data=binary),
        ]
        r = client.infer(R20, [_bytes(items, binary)], outputs=outputs)
        assert r.get_output("logits")["datatype"] == "BYTES"
        assert r.get_output("logits")["shape"] == [N, 3]
        rows = _classes(r.as_numpy("logits"))
        assert [(row[0][1], row[0][2]) for row in rows] == v1_top1
        for row, logits in zip(rows, reference["logits"], strict=True):
            assert [v for v, _, _ in row] == sorted((v for v, _, _ in row), reverse=True)
            for value, index, label in row:
                assert label == classes[index] and value == pytest.approx(logits[index], abs=2e-6)
        embedding = r.as_numpy("embedding")
        np.testing.assert_allclose(embedding, v1_emb["embeddings"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(embedding, reference["embedding"], rtol=1e-5, atol=1e-5)
        answers.append(rows)
    assert answers[0] == answers[1]


def test_classification_extension(
    client: triton.InferenceServerClient,
    images: np.ndarray,
    reference: dict[str, np.ndarray],
) -> None:
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=True, class_count=10),
        triton.InferRequestedOutput("logits", binary_data=False, class_count=25),  # clamped
        triton.InferRequestedOutput("embedding", binary_data=True, class_count=2),
    ]
    r = client.infer(R20, [_uint8(images, True)], outputs=outputs)
    assert [o["name"] for o in r.get_response()["outputs"]] == [
        "probabilities",
        "logits",
        "embedding",
    ]
    probs = _classes(r.as_numpy("probabilities"))
    assert r.as_numpy("logits").shape == (N, 10)
    for row, want in zip(probs, reference["probabilities"], strict=True):
        assert sorted(i for _, i, _ in row) == list(range(10))
        assert sum(v for v, _, _ in row) == pytest.approx(1.0, abs=1e-4)
        for value, index, label in row:
            assert value == pytest.approx(want[index], abs=1e-6)
            assert label == tiny.LABELS[index]
    emb = _classes(r.as_numpy("embedding"))
    assert [len(row) for row in emb] == [2] * N
    # An embedding's dimensions have no labels: "value:index" only, as Triton writes it.
    for row, want in zip(emb, reference["embedding"], strict=True):
        assert row[0][1] == int(want.argmax()) and row[0][2] is None


def test_binary_wire_format_by_hand(
    server: ProcessServer, images: np.ndarray, reference: dict[str, np.ndarray]
) -> None:
    """What any V2 client sends and reads: JSON header, then the tensors' bytes."""
    data = images[:2].tobytes()
    header = orjson.dumps(
        {
            "id": "wire",
            "inputs": [
                {"name": "images", "datatype": "UINT8", "shape": [2, C, C, 3],
                 "parameters": {"binary_data_size": len(data)}}
            ],
            "parameters": {"binary_data_output": True},  # every output, binary
        }
    )  # fmt: skip
    r = httpx.post(
        server.url + f"/v2/models/{R20}/infer",
        content=header + data,
        headers={HEADER: str(len(header))},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers[HEADER])
    doc = orjson.loads(r.content[:length])
    assert doc["id"] == "wire" and [o["name"] for o in doc["outputs"]] == list(reference)
    pos = length
    for out in doc["outputs"]:
        size = out["parameters"]["binary_data_size"]
        tensor = np.frombuffer(r.content[pos : pos + size], "<f4").reshape(out["shape"])
        np.testing.assert_allclose(tensor, reference[out["name"]][:2], rtol=1e-5, atol=1e-5)
        pos += size
    assert pos == len(r.content)

    # A binary BYTES output: 4-byte little-endian length, then the string, per element.
    body = orjson.loads(header)
    body["outputs"] = [{"name": "logits", "parameters": {"binary_data": True, "classification": 2}}]
    header = orjson.dumps(body)
    r = httpx.post(
        server.url + f"/v2/models/{R20}/infer",
        content=header + data,
        headers={HEADER: str(len(header))},
    )
    length = int(r.headers[HEADER])
    (out,) = orjson.loads(r.content[:length])["outputs"]
    assert (out["datatype"], out["shape"]) == ("BYTES", [2, 2])
    raw, strings = r.content[length:], []
    while raw:
        (size,) = struct.unpack("<I", raw[:4])
        strings.append(raw[4 : 4 + size].decode())
        raw = raw[4 + size :]
    assert len(strings) == 4 and all(CLASS.match(s) for s in strings)
    top = [int(CLASS.match(s).group(2)) for s in strings[::2]]  # type: ignore[union-attr]
    assert top == list(reference["logits"][:2].argmax(1))


def test_json_only_as_curl_sends_it(
    server: ProcessServer, images: np.ndarray, reference: dict[str, np.ndarray]
) -> None:
    body = {
        "id": "curl-1",
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [2, C, C, 3],
             "data": images[:2].tolist()}  # nested lists; flat ones work too
        ],
        "outputs": [{"name": "probabilities"}],
    }  # fmt: skip
    r = httpx.post(server.url + f"/v2/models/{R20}/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and HEADER not in r.headers
    doc = r.json()
    assert (doc["id"], doc["model_name"], doc["model_version"]) == ("curl-1", R20, "1")
    (out,) = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("probabilities", "FP32", [2, 10])
    assert len(out["data"]) == 20  # flat, row-major
    np.testing.assert_allclose(
        np.reshape(out["data"], (2, 10)), reference["probabilities"][:2], atol=1e-6
    )


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(
    client: triton.InferenceServerClient,
    images: np.ndarray,
    reference: dict[str, np.ndarray],
    algorithm: str,
) -> None:
    outputs = [triton.InferRequestedOutput("logits")]
    r = client.infer(
        R20, [_uint8(images, True)], outputs=outputs, request_compression_algorithm=algorithm
    )
    np.testing.assert_allclose(r.as_numpy("logits"), reference["logits"], rtol=1e-5, atol=1e-5)


def test_other_model_and_v2_metrics(
    client: triton.InferenceServerClient, server: ProcessServer, images: np.ndarray
) -> None:
    before = httpx.get(server.url + "/metrics").text
    r = client.infer(R56, [_uint8(images, True)], outputs=[triton.InferRequestedOutput("logits")])
    assert r.get_response()["model_name"] == R56 and r.as_numpy("logits").shape == (N, 10)
    with pytest.raises(InferenceServerException):
        client.infer(R56, [_uint8(images[:, : C // 2], True)])
    after = httpx.get(server.url + "/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    requests = "resnet_serve_requests_total"
    assert delta(requests, endpoint="v2_infer", model=R56, status="200") == 1
    assert delta(requests, endpoint="v2_infer", model=R56, status="400") == 1
    assert delta("resnet_serve_images_total", endpoint="v2_infer", model=R56) == N
    assert delta("resnet_serve_batch_size_sum", model=R56) == N


# --- errors: {"error": "message"}, the status, the message ---


def _error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


def _images_input(datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "datatype": datatype, "shape": shape, "data": data}]}


ZEROS = [0] * PIXELS
SHAPE = f"[N, {C}, {C}, 3]"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (_images_input("FP32", [1, C, C, 3], ZEROS), ["FP32", f"UINT8 {SHAPE}"]),
        (_images_input("UINT8", [1, C - 1, C, 3], ZEROS), [SHAPE, f"[1, {C - 1}, {C}, 3]"]),
        (_images_input("UINT8", [1, C, C, 3], ZEROS[:-1]), [f"{PIXELS - 1} values", f"{PIXELS}"]),
        (_images_input("UINT8", [1, C, C, 3], [256] * PIXELS), ["0 to 255"]),
        (_images_input("UINT8", [1, C, C, 3], [0.5] * PIXELS), ["0 to 255"]),
        (_images_input("UINT8", [0, C, C, 3], []), ["no images"]),
        (_images_input("BYTES", [1, 2], ["x", "y"]), ["BYTES shape must be [N] or [N, 1]"]),
        (_images_input("BYTES", [2], ["%%%"]), ["image 0", "base64"]),
        (_images_input("BYTES", [1], ["aGVsbG8="]), ["image 0", "not a recognised image"]),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1]}]}, ["'pixels'"]),
        ({"inputs": []}, ["inputs"]),
        ({**_images_input("UINT8", [1, C, C, 3], ZEROS), "outputs": [{"name": "scores"}]},
         ["'scores'", "logits, probabilities, embedding"]),
        ({**_images_input("UINT8", [1, C, C, 3], ZEROS),
          "outputs": [{"name": "logits", "parameters": {"classification": -1}}]},
         ["classification"]),
    ],
)  # fmt: skip
def test_400_bad_requests(server: ProcessServer, body: dict[str, Any], words: list[str]) -> None:
    _error(httpx.post(server.url + f"/v2/models/{R20}/infer", json=body), 400, *words)


def test_400_binary_framing_and_headers(server: ProcessServer, tiny_pngs: list[bytes]) -> None:
    url = server.url + f"/v2/models/{R20}/infer"
    _error(httpx.post(url, content=b"{not json"), 400, "invalid JSON")
    items = [tiny_pngs[0], b"definitely not an image"]
    data = b"".join(struct.pack("<I", len(i)) + i for i in items)
    inp = {"name": "images", "datatype": "BYTES", "shape": [2]}

    def post(
        size: int, payload: bytes, length: str | None = None, **headers: str
    ) -> httpx.Response:
        header = orjson.dumps({"inputs": [{**inp, "parameters": {"binary_data_size": size}}]})
        headers[HEADER] = length if length is not None else str(len(header))
        return httpx.post(url, content=header + payload, headers=headers)

    _error(post(len(data), data), 400, "image 1")
    extra = struct.pack("<I", 0)  # a third, empty element
    _error(post(len(data) + 4, data + extra), 400, "more than 2 BYTES elements")
    _error(post(len(data) + 1, data + b"x"), 400, "truncated")
    _error(post(len(data), data[:-1]), 400, "binary_data_size")
    _error(post(len(data), data, length="99999"), 400, HEADER)
    _error(post(len(data), data, length="0"), 400, HEADER)
    # Strict: the header's size in digits, nothing else int() would take.
    good = str(
        len(orjson.dumps({"inputs": [{**inp, "parameters": {"binary_data_size": len(data)}}]}))
    )
    _error(post(len(data), data, length=good), 400, "image 1")  # the right size, in digits
    for lenient in (f"+{good}", f"{good[:-1]}_{good[-1]}", f"0x{int(good):x}"):
        _error(post(len(data), data, length=lenient), 400, HEADER)
    no_header = orjson.dumps({"inputs": [{**inp, "parameters": {"binary_data_size": 3}}]})
    _error(httpx.post(url, content=no_header), 400, HEADER)
    header = orjson.dumps(_images_input("UINT8", [1, C, C, 3], ZEROS))
    # /v1 answers an invalid timeout header with 422; the protocol's form is a 400.
    _error(post(len(data), data, **{"X-Request-Timeout-Ms": "soon"}), 400, "X-Request-Timeout-Ms")
    r = httpx.post(url, content=header, headers={"X-Request-Timeout-Ms": "0.001"})
    _error(r, 504, "timed out")
    # Strict: one gzip stream, nothing after it (a second member, or stray bytes).
    for tail in (gzip.compress(b"{}"), b"junk"):
        r = httpx.post(
            url, content=gzip.compress(header) + tail, headers={"Content-Encoding": "gzip"}
        )
        _error(r, 400, "data after the end of the gzip stream")
    r = httpx.post(url, content=header, headers={"Content-Encoding": "br"})
    assert "gzip" in r.headers["accept-encoding"]
    _error(r, 415, "Content-Encoding br")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "ICO")
    body = _images_input("BYTES", [1], [base64.b64encode(buf.getvalue()).decode()])
    _error(httpx.post(url, json=body), 415, "ICO")
    _error(httpx.post(url, json=_images_input("UINT8", [65, C, C, 3], [])), 413, "limit is 64")


def test_404_unknown_model_or_version(
    client: triton.InferenceServerClient, server: ProcessServer, images: np.ndarray
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", [_uint8(images, True)])
    assert info.value.status() == "404" and R20 in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer(R20, [_uint8(images, True)], model_version="2")
    assert info.value.status() == "404"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404"
    _error(httpx.get(server.url + "/v2/models/nope/ready"), 404, "nope", R20)
    _error(httpx.get(server.url + f"/v2/models/{R20}/versions/7"), 404, "version 7")
    # A wrong datatype through the client: the message comes back intact.
    inp = triton.InferInput("images", [1, C, C, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, C, C, 3), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(R20, [inp])
    assert info.value.status() == "400" and "FP32" in info.value.message()


def test_limits_and_keys(repository: Path, images: np.ndarray) -> None:
    with thread_server(
        # A body limit that three of the model's images pass in binary, not in JSON.
        repository, api_keys=["v2-key"], max_images_per_request=3, max_body_bytes=1500,
        max_image_pixels=4096,
    ) as srv:  # fmt: skip
        c = triton.InferenceServerClient(srv.url.removeprefix("http://"))
        key = {"Authorization": "Bearer v2-key"}

        def auth() -> dict[str, str]:
            return dict(key)  # tritonclient adds its own headers to the dict it is given

        try:
            # Probes stay open; everything else needs the key, refused in protocol form.
            assert c.is_server_live() and c.is_server_ready()
            _error(httpx.get(srv.url + "/v2"), 401, "API key")
            _error(httpx.post(srv.url + f"/v2/models/{R20}/infer", json={}), 401)
            assert not c.is_model_ready(R20)
            assert c.is_model_ready(R20, headers=auth())
            r = c.infer(R20, [_uint8(images[:3], True)], headers=auth())
            assert r.as_numpy("logits").shape == (3, 10)
            with pytest.raises(InferenceServerException) as info:
                c.infer(R20, [_uint8(images[:4], True)], headers=auth())
            assert info.value.status() == "413" and "limit is 3" in info.value.message()
            url = srv.url + f"/v2/models/{R20}/infer"
            body = _images_input("UINT8", [3, C, C, 3], images[:3].ravel().tolist())
            _error(httpx.post(url, json=body, headers=auth()), 413, "1500 bytes")
            # Compressed, the body passes the limit only once inflated: still a 413.
            with pytest.raises(InferenceServerException) as info:
                c.infer(R20, [_uint8(np.full((3, C, C, 3), 100, np.uint8), False)],
                        headers=auth(), request_compression_algorithm="gzip")  # fmt: skip
            assert info.value.status() == "413" and "decompressed" in info.value.message()
            big = encode(np.zeros((100, 100, 3), np.uint8), "PNG")
            with pytest.raises(InferenceServerException) as info:
                c.infer(R20, [_bytes([big], True)], headers=auth())
            assert info.value.status() == "413" and "image 0" in info.value.message()
        finally:
            c.close()


# --- parsing, without a server: whatever the body, a request or a typed 4xx ---

SPEC = ModelSpec(
    name="m", path=Path("."), num_classes=3, labels=("a", "b", "c"), embedding_dim=4,
    preprocess=PreprocessSpec(resize=2, crop=2, mean=(0.5,) * 3, std=(0.5,) * 3), metadata={},
)  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False)
    | st.sampled_from(["images", "UINT8", "BYTES", "logits", "iVBORw0KGgo=", "%"]),
    lambda inner: st.lists(inner, max_size=13) | st.dictionaries(
        st.sampled_from(["id", "inputs", "outputs", "name", "datatype", "shape", "data",
                         "parameters", "binary_data_size", "binary_data", "classification",
                         "binary_data_output"]),
        inner, max_size=6,
    ),
    max_leaves=40,
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_json, tail=st.binary(max_size=24), header=st.booleans())
def test_any_body_parses_or_is_a_typed_client_error(doc: Any, tail: bytes, header: bool) -> None:
    head = orjson.dumps(doc)
    try:
        parsed = parse_request(
            head + tail if header else head,
            header_length=str(len(head)) if header else None, content_encoding=None,
            spec=SPEC, max_images=4, max_body_bytes=1 << 20,
        )  # fmt: skip
    except ServeError as exc:
        assert 400 <= answer(exc).v2_http < 500, exc
        return
    n = len(parsed.images)
    assert 1 <= n <= 4 and parsed.outputs
    if isinstance(parsed.images, np.ndarray):
        assert parsed.images.dtype == np.uint8 and parsed.images.shape == (n, 2, 2, 3)


@pytest.mark.parametrize(
    "data",
    [[0] * 100_000, [[[[0] * 3] * 2] * 2] * 50_000, [[[[0] * 30_000] * 2] * 2]],
    ids=["flat", "nested-first-dimension", "nested-last-dimension"],
)
def test_uint8_data_larger_than_its_shape_is_refused_before_it_is_copied(
    data: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: numpy copied the whole list before its size was compared with the shape, which
    # for tens of millions of numbers was seconds on the event loop.
    from resnet_serve.service import v2_codec

    def no_copy(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("copied before the size check")

    class NoCopy:  # numpy as the module under test sees it, less ``asarray``
        asarray = staticmethod(no_copy)

        def __getattr__(self, name: str) -> object:
            return getattr(np, name)

    # The module's own name only: numpy itself stays whole for every other thread.
    monkeypatch.setattr(v2_codec, "np", NoCopy())
    body = orjson.dumps({"inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": data}
    ]})  # fmt: skip
    with pytest.raises(ServeError) as exc:
        parse_request(
            body, header_length=None, content_encoding=None, spec=SPEC, max_images=4,
            max_body_bytes=1 << 22,
        )  # fmt: skip
    assert answer(exc.value).v2_http == 400 and "values" in str(exc.value)
