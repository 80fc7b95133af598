"""Triton's perf_analyzer, unchanged, against `resnet-serve`: it reads the model metadata
and configuration, sends preprocessed UINT8 images (to the model) or encoded PNG files as
BYTES (to its ``.encoded`` name, whose metadata declares them) at concurrency 1 to 8, and
reads the statistics extension around every measurement window. Any failed request stops
it with a non-zero exit; the statistics must count every request it sent, and none failed.

Bounded: windows of 250 ms, a stability bound no run misses (the verdict never depends
on the machine's speed or load), about 10 s per run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from resnet_serve.service.settings import Settings
from resnet_serve.service.v2_names import ENCODED_SUFFIX
from tests.service import tiny
from tests.service.servers import ProcessServer, free_port
from tools.perf_analyzer import PerfAnalyzer, input_data, report_rows

MODEL = tiny.NAME
CONCURRENCY = range(1, 9)
# -s: the stability bound, in percent: far past any run's spread, so that noise on a shared
# machine never stops a run; -r: windows at most per level.
BOUNDED = ["-p", "250", "-s", "1000", "-r", "10"]
NO_GRPC = pytest.mark.skipif(
    "grpc_port" not in Settings.model_fields, reason="no gRPC server in this build"
)


@pytest.fixture(scope="module")
def served(tiny_repository: Path) -> Iterator[tuple[ProcessServer, int | None]]:
    """`resnet-serve` with the tiny model, and its gRPC port where this build has one."""
    grpc_port = free_port() if "grpc_port" in Settings.model_fields else None
    env = {"grpc_port": str(grpc_port)} if grpc_port else {}
    srv = ProcessServer(tiny_repository, **env).start()
    yield srv, grpc_port
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory, tiny_pngs: list[bytes]) -> Path:
    """perf_analyzer's --input-data: 16 images as PNG files, BYTES shape [1]."""
    path = tmp_path_factory.mktemp("input") / "pngs.json"
    path.write_bytes(orjson.dumps(input_data(tiny_pngs[:16])))
    return path


def _stats(srv: ProcessServer, model: str = MODEL) -> dict:
    r = httpx.get(f"{srv.url}/v2/models/{model}/stats")
    assert r.status_code == 200, r.text
    (entry,) = r.json()["model_stats"]
    assert entry["name"] == model
    return entry["inference_stats"]


def _profile(
    tool: PerfAnalyzer,
    srv: ProcessServer,
    url: str,
    protocol: str,
    tmp: Path,
    data: Path | None = None,
) -> None:
    """perf_analyzer at concurrency 1..8: UINT8 to the model, or (``data``: its
    --input-data) encoded files to the model's .encoded name."""
    model = MODEL if data is None else MODEL + ENCODED_SUFFIX
    before = _stats(srv, model)
    report = tmp / "report.csv"
    inputs = [] if data is None else ["--input-data", str(data)]
    proc = tool.run(
        ["-m", model, *inputs, "-u", url, "-i", protocol,
         "--concurrency-range", f"{CONCURRENCY[0]}:{CONCURRENCY[-1]}:1",
         *BOUNDED, "-f", str(report)]
    )  # fmt: skip
    output = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, f"perf_analyzer exited {proc.returncode}:\n{output}"
    rows = report_rows(report.read_text())
    assert sorted(int(r["Concurrency"]) for r in rows) == list(CONCURRENCY), proc.stdout
    for row in rows:
        assert float(row["Inferences/Second"]) > 0, row
        # Read from the statistics extension: the server's own split of the latency.
        assert int(row["Server Compute Infer"]) > 0, row
    after = _stats(srv, model)
    assert after["fail"]["count"] == before["fail"]["count"], after
    # Every request perf_analyzer sent, measured or not (warm-up, windows), is counted.
    sent = after["success"]["count"] - before["success"]["count"]
    assert sent >= len(rows), (sent, proc.stdout)
    assert "Successful request count" in proc.stdout, proc.stdout


def test_http_uint8(
    perf_analyzer: PerfAnalyzer, served: tuple[ProcessServer, int | None], tmp_path: Path
) -> None:
    srv, _ = served
    _profile(perf_analyzer, srv, f"127.0.0.1:{srv.port}", "http", tmp_path)


@NO_GRPC
def test_grpc_uint8(
    perf_analyzer: PerfAnalyzer, served: tuple[ProcessServer, int | None], tmp_path: Path
) -> None:
    srv, grpc_port = served
    _profile(perf_analyzer, srv, f"127.0.0.1:{grpc_port}", "grpc", tmp_path)


@pytest.mark.parametrize("protocol", ["http", pytest.param("grpc", marks=NO_GRPC)])
def test_bytes(
    perf_analyzer: PerfAnalyzer,
    served: tuple[ProcessServer, int | None],
    pngs: Path,
    tmp_path: Path,
    protocol: str,
) -> None:
    srv, grpc_port = served
    port = grpc_port if protocol == "grpc" else srv.port
    _profile(perf_analyzer, srv, f"127.0.0.1:{port}", protocol, tmp_path, pngs)


def test_http_with_an_api_key(perf_analyzer: PerfAnalyzer, tiny_repository: Path) -> None:
    """With --api-keys, perf_analyzer's -H carries the key (its metadata, configuration and
    statistics requests too); without it, it stops at once."""
    key = "perf-analyzer-key"
    srv = ProcessServer(tiny_repository, api_keys=key).start()
    try:
        common = ["-m", MODEL, "-u", f"127.0.0.1:{srv.port}", "-i", "http",
                  "--concurrency-range", "1:2:1", *BOUNDED]  # fmt: skip
        refused = perf_analyzer.run(common)
        assert refused.returncode != 0, refused.stdout
        proc = perf_analyzer.run([*common, "-H", f"Authorization:Bearer {key}"])
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        assert "Concurrency: 2, throughput" in proc.stdout, proc.stdout
    finally:
        assert srv.stop() == 0
