"""Triton's model configuration, statistics and repository extensions: the builders'
documents are Triton's own messages (json_format.ParseDict into tritonclient's generated
classes, which rejects any unknown field or enum), and the HTTP routes answer them with
the counts of what was actually served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2

from resnet_serve.service.stats import ModelStats
from resnet_serve.service.triton_ext import (
    Instances,
    Scheduling,
    index_entry,
    model_config,
    model_statistics,
    repository_index,
)
from tests.service import tiny
from tests.service.faults import fail_runs, retire_sessions
from tests.service.servers import ProcessServer, thread_server

MODEL = tiny.NAME
METADATA = {
    "name": "m",
    "versions": ["1"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
    "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 64]},
    ],
}
SCHEDULING = Scheduling(
    max_batch_size=8, preferred_batch_sizes=[1, 2, 4, 8], max_queue_delay_us=2000,
    max_queue_size=64,
)  # fmt: skip


def test_config_is_a_triton_model_config() -> None:
    doc = model_config(METADATA, SCHEDULING, [Instances("cuda", 4, (0, 1)), Instances("cpu", 1)])
    msg = json_format.ParseDict({"config": doc}, service_pb2.ModelConfigResponse())
    config = msg.config
    assert config.max_batch_size == 8
    (image,) = config.input
    assert image.data_type == mc.TYPE_UINT8 and list(image.dims) == [32, 32, 3]
    assert image.format == mc.ModelInput.FORMAT_NHWC
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("logits", [10]),
        ("embedding", [64]),
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8]
    gpu, cpu = config.instance_group
    assert (gpu.kind, gpu.count, list(gpu.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, 4, [0, 1])
    assert (cpu.kind, cpu.count, list(cpu.gpus)) == (mc.ModelInstanceGroup.KIND_CPU, 1, [])


def test_statistics_count_every_stage() -> None:
    stats = ModelStats()
    # Two images queued at 0 and 1 s, taken at 2 s, input ready at 2.5, run until 4.5,
    # handed out at 5: every image is charged the batch's whole stages.
    stats.executed([0.0, 1.0], 2.0, 2.5, 4.5, 5.0)
    stats.executed([5.0], 5.0, 5.0, 6.0, 6.0)
    stats.failed([])  # nothing: not counted
    doc = model_statistics([("m", "1", stats)])
    msg = json_format.ParseDict(doc, service_pb2.ModelStatisticsResponse())
    (entry,) = msg.model_stats
    assert (entry.name, entry.version) == ("m", "1")
    assert (entry.inference_count, entry.execution_count) == (3, 2)
    s = entry.inference_stats
    second = 1_000_000_000
    assert (s.queue.count, s.queue.ns) == (3, 3 * second)
    assert (s.success.count, s.success.ns) == (3, 9 * second + second)
    assert (s.compute_input.count, s.compute_input.ns) == (3, second)
    assert (s.compute_infer.count, s.compute_infer.ns) == (3, 4 * second + second)
    assert (s.compute_output.count, s.compute_output.ns) == (3, second)
    assert s.fail.count == 0
    assert [
        (b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in entry.batch_stats
    ] == [
        (1, 1, second),
        (2, 1, 2 * second),
    ]
    assert entry.last_inference > 0


def test_failed_batches_count_as_failed_requests_only() -> None:
    stats = ModelStats()
    stats.failed([0.0, 0.0, 0.0])
    doc = model_statistics([("m", "1", stats)])
    (entry,) = json_format.ParseDict(doc, service_pb2.ModelStatisticsResponse()).model_stats
    assert entry.inference_stats.fail.count == 3
    assert (entry.inference_count, entry.execution_count, entry.inference_stats.success.count) == (
        0, 0, 0,
    )  # fmt: skip


def test_repository_index_is_a_triton_index() -> None:
    entries = [index_entry("a", "1", "READY"), index_entry("b", "1", "LOADING", "warming up")]
    for ready_only, names in ((False, ["a", "b"]), (True, ["a"])):
        doc = {"models": repository_index(entries, ready_only)}
        msg = json_format.ParseDict(doc, service_pb2.RepositoryIndexResponse())
        assert [m.name for m in msg.models] == names


# --- over HTTP, against `resnet-serve` ---


@pytest.fixture(scope="module")
def srv(tiny_repository: Path) -> Iterator[ProcessServer]:
    server = ProcessServer(tiny_repository, max_batch_size="8", max_batch_delay_ms="3").start()
    yield server
    assert server.stop() == 0


def test_http_config(srv: ProcessServer) -> None:
    for path in (f"/v2/models/{MODEL}/config", f"/v2/models/{MODEL}/versions/1/config"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 200, r.text
        doc = r.json()
        config = json_format.ParseDict({"config": doc}, service_pb2.ModelConfigResponse()).config
        assert config.name == MODEL and config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 3000
        # The same tensors as the V2 metadata, less the batch dimension.
        meta = httpx.get(f"{srv.url}/v2/models/{MODEL}").json()
        assert [(t["name"], [-1, *t["dims"]]) for t in doc["input"] + doc["output"]] == [
            (t["name"], t["shape"]) for t in meta["inputs"] + meta["outputs"]
        ]
    # tritonclient's own call for it
    client = triton_http.InferenceServerClient(srv.url.removeprefix("http://"))
    assert client.get_model_config(MODEL)["max_batch_size"] == 8
    assert httpx.get(f"{srv.url}/v2/models/nope/config").status_code == 404
    assert httpx.get(f"{srv.url}/v2/models/{MODEL}/versions/2/config").status_code == 404


def test_http_statistics_count_what_was_served(srv: ProcessServer) -> None:
    client = triton_http.InferenceServerClient(srv.url.removeprefix("http://"))
    before = client.get_inference_statistics(MODEL)["model_stats"][0]
    images = np.random.default_rng(0).integers(0, 256, (3, tiny.CROP, tiny.CROP, 3), dtype=np.uint8)
    inp = triton_http.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    client.infer(MODEL, [inp])
    after = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 3
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    for stage in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert (
            after["inference_stats"][stage]["count"] - before["inference_stats"][stage]["count"]
            == 3
        )
    assert (
        after["inference_stats"]["compute_infer"]["ns"]
        > before["inference_stats"]["compute_infer"]["ns"]
    )
    assert after["last_inference"] > 0
    every = httpx.get(f"{srv.url}/v2/models/stats").json()
    assert [m["name"] for m in every["model_stats"]] == [MODEL]
    assert httpx.get(f"{srv.url}/v2/models/nope/stats").status_code == 404


def test_http_repository_index(srv: ProcessServer) -> None:
    expected = [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    assert httpx.post(f"{srv.url}/v2/repository/index").json() == expected
    assert httpx.post(f"{srv.url}/v2/repository/index", json={"ready": True}).json() == expected
    client = triton_http.InferenceServerClient(srv.url.removeprefix("http://"))
    assert client.get_model_repository_index() == expected
    for bad in (b"[1]", b"{", b'{"ready": "yes"}'):
        r = httpx.post(f"{srv.url}/v2/repository/index", content=bad)
        assert r.status_code == 400 and "error" in r.json(), r.text


def test_failed_runs_and_retired_sessions(tiny_repository: Path, tiny_pngs: list[bytes]) -> None:
    """A run that raises counts its images under ``fail`` (and nothing else); a model with
    no session left is UNAVAILABLE in the index, with the reason."""
    with thread_server(tiny_repository) as server:
        model = server.runtime.models[MODEL]
        fail_runs(model, 1)
        png = {"content-type": "image/png"}
        failed = httpx.post(f"{server.url}/v1/classify", content=tiny_pngs[0], headers=png)
        assert failed.status_code == 503, failed.text
        ok = httpx.post(f"{server.url}/v1/classify", content=tiny_pngs[0], headers=png)
        assert ok.status_code == 200, ok.text
        (entry,) = httpx.get(f"{server.url}/v2/models/{MODEL}/stats").json()["model_stats"]
        stats = entry["inference_stats"]
        assert (stats["fail"]["count"], stats["success"]["count"]) == (1, 1), stats
        assert (entry["inference_count"], entry["execution_count"]) == (1, 1), entry
        retire_sessions(model)
        httpx.post(f"{server.url}/v1/classify", content=tiny_pngs[0], headers=png)
        index = httpx.post(f"{server.url}/v2/repository/index").json()
        unavailable = {"state": "UNAVAILABLE", "reason": "no session able to run"}
        assert index == [{"name": MODEL, "version": "1", **unavailable}]
        assert httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}).json() == []
