"""The KServe V2 / Triton gRPC API with Triton's own client (``tritonclient.grpc``, sync
and asyncio), against a real server: the same answers as /v1, the same limits, keys and
deadlines, and a drain on SIGTERM that finishes the RPCs in flight."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient  # the dev extra: a missing client fails, never skips
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.service import tiny
from tests.service.servers import (
    ProcessServer,
    ThreadServer,
    free_port,
    hold,
    metric_value,
    png,
    thread_server,
    wait_until,
)

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
IMAGES = np.random.default_rng(11).integers(0, 256, (6, tiny.CROP, tiny.CROP, 3), np.uint8)


@pytest.fixture(scope="module")
def srv(tiny_repository: Path) -> Iterator[ThreadServer]:
    with thread_server(
        tiny_repository, grpc_port=free_port(), api_keys=[KEY], max_images_per_request=8,
        max_body_bytes=64 * 1024,
    ) as server:  # fmt: skip
        yield server


def target(srv: ThreadServer) -> str:
    return f"127.0.0.1:{srv.settings.grpc_port}"


def uint8_input(images: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    return inp


def bytes_input(images: np.ndarray) -> grpcclient.InferInput:
    blobs = np.array([png(i) for i in images], dtype=np.object_)
    inp = grpcclient.InferInput("images", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(blobs)
    return inp


def v1(srv: ThreadServer, images: np.ndarray) -> tuple[list[int], np.ndarray]:
    """/v1's top-1 and (not normalised) embeddings for the same images, sent as PNG."""
    files = [("file", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(images)]
    with httpx.Client(base_url=srv.url, headers=AUTH) as c:
        top = c.post("/v1/classify?top_k=1", files=files).json()["results"]
        emb = c.post("/v1/embed?normalize=false", files=files).json()["embeddings"]
    return [r["predictions"][0]["index"] for r in top], np.array(emb, np.float32)


def outputs() -> list[grpcclient.InferRequestedOutput]:
    return [
        grpcclient.InferRequestedOutput("logits"),
        grpcclient.InferRequestedOutput("embedding"),
        grpcclient.InferRequestedOutput("probabilities", class_count=2),
    ]


@pytest.mark.parametrize("form", ["UINT8", "BYTES"])
def test_sync_client_gets_what_v1_gets(srv: ThreadServer, form: str) -> None:
    client = grpcclient.InferenceServerClient(target(srv))
    assert client.is_server_live() and client.is_server_ready()  # open, as over HTTP
    assert client.is_model_ready(tiny.NAME, headers=AUTH)
    meta = client.get_model_metadata(tiny.NAME, headers=AUTH, as_json=True)
    assert meta["inputs"] == [
        {"name": "images", "datatype": "UINT8", "shape": ["-1", "8", "8", "3"]}
    ]
    assert client.get_server_metadata(headers=AUTH).name == "resnet-serve"
    inp = uint8_input(IMAGES) if form == "UINT8" else bytes_input(IMAGES)
    result = client.infer(tiny.NAME, [inp], outputs=outputs(), request_id="r1", headers=AUTH)
    top1, embeddings = v1(srv, IMAGES)
    assert result.as_numpy("logits").argmax(axis=1).tolist() == top1
    np.testing.assert_allclose(result.as_numpy("embedding"), embeddings, atol=1e-6)
    np.testing.assert_allclose(
        result.as_numpy("logits"), tiny.expected(IMAGES)["logits"], atol=1e-5
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (len(IMAGES), 2)
    assert [int(row[0].split(b":")[1]) for row in classes] == top1
    assert result.get_response().id == "r1"
    client.close()


def test_aio_client_gets_what_v1_gets(srv: ThreadServer) -> None:
    async def main() -> np.ndarray:
        client = aioclient.InferenceServerClient(target(srv))
        try:
            assert await client.is_server_ready()
            result = await client.infer(
                tiny.NAME, [uint8_input(IMAGES)], outputs=outputs()[:2], headers=AUTH
            )
            return result.as_numpy("logits"), result.as_numpy("embedding")
        finally:
            await client.close()

    logits, embeddings = asyncio.run(main())
    top1, v1_embeddings = v1(srv, IMAGES)
    assert logits.argmax(axis=1).tolist() == top1
    np.testing.assert_allclose(embeddings, v1_embeddings, atol=1e-6)


def _status(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as exc:
        call()
    return str(exc.value.status())


def test_keys_limits_and_errors_are_the_tables(srv: ThreadServer) -> None:
    client = grpcclient.InferenceServerClient(target(srv))
    one = [uint8_input(IMAGES[:1])]
    assert _status(lambda: client.infer(tiny.NAME, one)) == "StatusCode.UNAUTHENTICATED"
    bad = {"authorization": "Bearer nope"}
    assert (
        _status(lambda: client.infer(tiny.NAME, one, headers=bad)) == "StatusCode.UNAUTHENTICATED"
    )
    assert _status(lambda: client.get_model_metadata(tiny.NAME)) == "StatusCode.UNAUTHENTICATED"
    nine = [uint8_input(np.zeros((9, 8, 8, 3), np.uint8))]  # over max_images_per_request
    assert (
        _status(lambda: client.infer(tiny.NAME, nine, headers=AUTH))
        == "StatusCode.RESOURCE_EXHAUSTED"
    )
    big = [uint8_input(np.zeros((8, 64, 64, 3), np.uint8))]  # 96 KiB: over the message limit
    assert (
        _status(lambda: client.infer(tiny.NAME, big, headers=AUTH))
        == "StatusCode.RESOURCE_EXHAUSTED"
    )
    shape = [uint8_input(np.zeros((1, 4, 4, 3), np.uint8))]
    assert (
        _status(lambda: client.infer(tiny.NAME, shape, headers=AUTH))
        == "StatusCode.INVALID_ARGUMENT"
    )
    junk = np.array([b"not an image"], dtype=np.object_)
    inp = grpcclient.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(junk)
    assert (
        _status(lambda: client.infer(tiny.NAME, [inp], headers=AUTH))
        == "StatusCode.INVALID_ARGUMENT"
    )
    assert _status(lambda: client.infer("nope", one, headers=AUTH)) == "StatusCode.NOT_FOUND"
    out = [grpcclient.InferRequestedOutput("layer1", class_count=1)]
    assert _status(
        lambda: client.infer(tiny.NAME, one, outputs=out, headers=AUTH)
    ) == "StatusCode.INVALID_ARGUMENT"  # fmt: skip
    client.close()
    text = httpx.get(srv.url + "/metrics", headers=AUTH).text
    assert (
        metric_value(text, "resnet_serve_requests_total", endpoint="grpc_infer", status="401") >= 2
    )
    assert (
        metric_value(text, "resnet_serve_requests_total", endpoint="grpc_infer", status="413") >= 1
    )
    assert srv.runtime.models[tiny.NAME].batcher.pending == 0  # type: ignore[union-attr]


def test_grpc_deadline_cancels_the_work(tiny_repository: Path) -> None:
    with thread_server(tiny_repository, grpc_port=free_port()) as srv:
        gate = hold(srv.runtime)
        client = grpcclient.InferenceServerClient(target(srv))
        try:
            first = threading.Thread(
                target=lambda: client.infer(tiny.NAME, [uint8_input(IMAGES[:1])]), daemon=True
            )
            first.start()  # holds the only session
            assert gate.entered.wait(60)
            status = _status(
                lambda: client.infer(tiny.NAME, [uint8_input(IMAGES[1:2])], client_timeout=0.5)
            )
            assert status == "StatusCode.DEADLINE_EXCEEDED"
            gate.set()
            first.join(60)
            batcher = srv.runtime.models[tiny.NAME].batcher
            wait_until(lambda: batcher.pending == 0 and batcher.queued == 0, timeout=30)  # type: ignore[union-attr]
        finally:
            gate.set()
            client.close()


def test_sigterm_drains_rpcs_in_flight(tiny_repository: Path) -> None:
    port = free_port()
    srv = ProcessServer(tiny_repository, holdable=True, grpc_port=str(port))
    srv.start()
    results: list[object] = []
    try:
        srv.hold()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")

        def infer() -> None:
            try:
                r = client.infer(tiny.NAME, [uint8_input(IMAGES[:2])], client_timeout=120)
                results.append(r.as_numpy("logits"))
            except InferenceServerException as exc:
                results.append(exc)

        worker = threading.Thread(target=infer, daemon=True)
        worker.start()
        wait_until(srv.entered, timeout=60)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        # Draining: new RPCs are refused (even liveness, which answers whenever it is
        # taken) ...
        late = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        wait_until(lambda: not _taken(late), timeout=30)
        late.close()
        srv.release()
        worker.join(60)
        # ... and the one in flight got its answer.
        assert len(results) == 1 and isinstance(results[0], np.ndarray), results
        np.testing.assert_allclose(results[0], tiny.expected(IMAGES[:2])["logits"], atol=1e-5)
        assert srv.stop() == 0
    finally:
        srv.release()
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)


def _taken(client: grpcclient.InferenceServerClient) -> bool:
    """Whether the server takes a new RPC at all."""
    try:
        return client.is_server_live(client_timeout=5)
    except InferenceServerException:
        return False


def test_real_model_same_top1_and_embeddings_as_v1(
    r20_repository: Path, cifar_test: dict[str, np.ndarray]
) -> None:
    """The acceptance check on a real export: CIFAR ResNet-20, 16 test images, as
    preprocessed UINT8 and as PNG files, through the sync and the asyncio client."""
    images = cifar_test["images"][:16]
    with thread_server(r20_repository, grpc_port=free_port()) as srv:
        top1, embeddings = v1(srv, images)
        client = grpcclient.InferenceServerClient(target(srv))
        wanted = outputs()[:2]
        for inp in (uint8_input(images), bytes_input(images)):
            result = client.infer("resnet20_cifar10", [inp], outputs=wanted)
            assert result.as_numpy("logits").argmax(axis=1).tolist() == top1
            np.testing.assert_allclose(result.as_numpy("embedding"), embeddings, atol=1e-5)
        client.close()

        async def aio() -> np.ndarray:
            c = aioclient.InferenceServerClient(target(srv))
            try:
                r = await c.infer("resnet20_cifar10", [uint8_input(images)], outputs=wanted)
                return r.as_numpy("logits")
            finally:
                await c.close()

        assert asyncio.run(aio()).argmax(axis=1).tolist() == top1


def test_typed_contents_as_well_as_raw(srv: ThreadServer) -> None:
    """Clients other than tritonclient may send typed contents (``uint_contents`` for
    UINT8, ``bytes_contents`` for BYTES): the same answers."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    images = IMAGES[:2]
    with grpc.insecure_channel(target(srv)) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        typed = pb.ModelInferRequest(model_name=tiny.NAME)
        inp = typed.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
        inp.contents.uint_contents.extend(images.ravel().tolist())
        typed.outputs.add(name="logits")
        encoded = pb.ModelInferRequest(model_name=tiny.NAME)
        inp = encoded.inputs.add(name="images", datatype="BYTES", shape=[2])
        inp.contents.bytes_contents.extend(png(i) for i in images)
        encoded.outputs.add(name="logits")
        for request in (typed, encoded):
            response = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
            (out,) = response.outputs
            assert out.name == "logits" and list(out.shape) == [2, 10]
            logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
            np.testing.assert_allclose(logits, tiny.expected(images)["logits"], atol=1e-5)
        bad = pb.ModelInferRequest(model_name=tiny.NAME)
        inp = bad.inputs.add(name="images", datatype="UINT8", shape=[1, 8, 8, 3])
        inp.contents.uint_contents.extend([300] * 192)  # not a UINT8 value
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(bad, metadata=tuple(AUTH.items()))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_triton_extensions_answer_what_http_answers(srv: ThreadServer) -> None:
    # ModelConfig, ModelStatistics and RepositoryIndex: the documents of /v2/models/{m}/config,
    # /v2/models/stats and /v2/repository/index, as the protocol's messages.
    from google.protobuf import json_format

    client = grpcclient.InferenceServerClient(target(srv))
    name = tiny.NAME
    client.infer(name, [uint8_input(IMAGES[:2])], headers=AUTH)
    with httpx.Client(base_url=srv.url, headers=AUTH) as c:
        config = c.get(f"/v2/models/{name}/config").json()
        stats = c.get(f"/v2/models/{name}/stats").json()
        index = c.post("/v2/repository/index", json={}).json()
    got = client.get_model_config(name, headers=AUTH, as_json=True)["config"]
    expected = json_format.ParseDict(
        {"config": config}, grpcclient.service_pb2.ModelConfigResponse()
    )
    assert got == json_format.MessageToDict(expected, preserving_proto_field_name=True)["config"]
    assert got["max_batch_size"] > 0 and got["input"][0]["name"] == "images"
    grpc_stats = client.get_inference_statistics(name, headers=AUTH, as_json=True)
    (entry,) = grpc_stats["model_stats"]
    (http_entry,) = stats["model_stats"]
    assert entry["name"] == name
    # Counted from the same statistics: the gRPC call comes after the HTTP one.
    assert int(entry["inference_count"]) >= int(http_entry["inference_count"]) >= 2
    everything = client.get_inference_statistics("", headers=AUTH, as_json=True)
    assert {m["name"] for m in everything["model_stats"]} == {m["name"] for m in index}
    repo = client.get_model_repository_index(headers=AUTH, as_json=True)
    assert [(m["name"], m["state"]) for m in repo["models"]] == [
        (m["name"], m["state"]) for m in index
    ]
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_config("no-such-model", headers=AUTH)
    assert "NOT_FOUND" in str(exc.value.status())
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_config(name)  # no key
    assert "UNAUTHENTICATED" in str(exc.value.status())


def test_malformed_messages_are_invalid_and_unsupported_methods_unimplemented(
    srv: ThreadServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: grpcio's deserializer ran outside every handler, so a message that does not
    # parse was UNKNOWN with a logged traceback; the generated stub's methods (load,
    # shared memory, trace and log settings) logged one too.
    import grpc

    caplog.set_level("ERROR")
    with grpc.insecure_channel(target(srv)) as channel:

        def call(method: str, body: bytes) -> grpc.StatusCode:
            stub = channel.unary_unary(
                f"/inference.GRPCInferenceService/{method}",
                request_serializer=lambda x: x, response_deserializer=lambda x: x,
            )  # fmt: skip
            try:
                stub(body, metadata=tuple(AUTH.items()), timeout=30)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        for method in ("ModelInfer", "ModelMetadata", "ServerLive"):
            assert call(method, b"\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT, method
        bad_utf8 = b"\x0a\x02\xc3\x28"  # field 1 (a name), two bytes that are not UTF-8
        assert call("ModelMetadata", bad_utf8) == grpc.StatusCode.INVALID_ARGUMENT
        assert call("ServerLive", b"") == grpc.StatusCode.OK  # an empty message parses
        for method in ("RepositoryModelLoad", "SystemSharedMemoryStatus", "LogSettings"):
            assert call(method, b"") == grpc.StatusCode.UNIMPLEMENTED, method
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_typed_contents_larger_than_their_shape_are_refused_before_a_copy(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: 30 million uint_contents were copied into numpy (and 15 million bytes_contents
    # into a list) on the event loop before their count was compared with the shape.
    from tritonclient.grpc import service_pb2 as pb

    from resnet_serve.service import grpc_codec
    from resnet_serve.service.errors import BadRequestError
    from resnet_serve.service.repository import load_model_spec

    def no_copy(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("copied before the count check")

    class NoCopy:  # numpy as the module under test sees it, less ``asarray``
        asarray = staticmethod(no_copy)

        def __getattr__(self, name: str) -> object:
            return getattr(np, name)

    # The module's own name only: numpy itself stays whole for every other thread.
    monkeypatch.setattr(grpc_codec, "np", NoCopy())
    spec = load_model_spec(tiny_repository / tiny.NAME)
    for datatype, shape, field, item in (
        ("UINT8", [1, tiny.CROP, tiny.CROP, 3], "uint_contents", 0),
        ("BYTES", [1], "bytes_contents", b""),
    ):
        request = pb.ModelInferRequest(model_name=tiny.NAME)
        inp = request.inputs.add(name="images", datatype=datatype, shape=shape)
        getattr(inp.contents, field).extend([item] * 100_000)
        with pytest.raises(BadRequestError, match="100000"):
            grpc_codec.parse_request(request, spec, max_images=8)
