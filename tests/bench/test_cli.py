"""``resnet-bench`` end to end on a tiny model: the real service and the baseline as
subprocesses, a fixed number of requests per step, and the three outputs checked for
structure. Nothing here asserts a speed, nor depends on one (a step measures REQUESTS
answers, however long they take): CI machines differ and are shared."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_serve.bench.cli import main
from tests.conftest import WEIGHTS_HOME

REQUESTS = 8  # measured per step
HTTP_COLUMNS = [
    "system", "clients", "img/s", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors",
    "client CPU", "server CPU", "mean batch", "client µs/img", "server µs/img",
]  # fmt: skip


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading`` (header row included)."""
    lines = markdown.split(heading, 1)[1].splitlines()
    rows, started = [], False
    for line in lines:
        if line.startswith("|"):
            started = True
            if not set(line) <= set("|-: "):
                rows.append([c.strip() for c in line.strip("|").split("|")])
        elif started:
            break
    return rows


@pytest.fixture(scope="module")
def bench_run(cifar_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    for module in ("skimage", "matplotlib", "rich", "torch"):  # the bench and export extras
        pytest.importorskip(module)
    out = tmp_path_factory.mktemp("bench-out")
    corpus_dir = tmp_path_factory.mktemp("corpus")
    with pytest.MonkeyPatch.context() as mp:
        # The baseline's default weights come from the shared, offline torch hub cache.
        mp.setenv("TORCH_HOME", str(WEIGHTS_HOME))
        # One OpenMP thread for the baseline's torch: on a CPU shared with other jobs its
        # default spinning threads can slow it a hundredfold, and this test is about
        # structure, not speed.
        mp.setenv("OMP_NUM_THREADS", "1")
        rc = main([
            "--start-server", "--repository", str(cifar_repository),
            "--model", "resnet20_cifar10", "--concurrency", "1,4",
            "--requests", str(REQUESTS), "--warmup", "0.3",
            "--offline-seconds", "0.1", "--offline-rounds", "2",
            "--corpus-size", "16", "--corpus-dir", str(corpus_dir),
            "--baseline", "--baseline-ort", "--ratio-concurrency", "4",
            "--out", str(out), "--no-progress",
        ])  # fmt: skip
    return rc, out


def test_markdown_report(bench_run: tuple[int, Path]) -> None:
    rc, out = bench_run
    assert rc == 0
    text = (out / "results.md").read_text()
    header, *rows = _table(text, "## HTTP load")
    assert header == HTTP_COLUMNS
    assert "corpus 16 JPEGs, client raw" in text
    assert [(r[0], r[1]) for r in rows] == [
        ("resnet-serve", "1"), ("resnet-serve", "4"),
        ("FastAPI + onnxruntime", "1"), ("FastAPI + onnxruntime", "4"),
        ("naive FastAPI + PyTorch", "1"), ("naive FastAPI + PyTorch", "4"),
    ]  # fmt: skip
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0
        assert float(r[4]) <= float(r[5]) <= float(r[6])
        assert r[7] == "0"
        # The service's batches are read from its /metrics; the baseline has none.
        assert (float(r[10]) >= 1) if r[0] == "resnet-serve" else (r[10] == "-")
        # CPU per image: the CPU share over the rate, for the client and the server (the
        # share is printed to a whole percent).
        for share, per_image in ((r[8], r[11]), (r[9], r[12])):
            low, high = (1e4 * (float(share.rstrip("%")) + d) / float(r[2]) for d in (-0.5, 0.5))
            assert low - 1 <= float(per_image) <= high + 1, (share, per_image, r[2])
    header, *offline = _table(text, "## Offline limits")
    assert header == ["measurement", "img/s", "p50 ms per call", "CPU", "CPU µs/img"]
    assert len(offline) == 6
    assert all(float(r[1]) > 0 and r[3].endswith("%") for r in offline)
    for r in offline:
        low, high = (1e4 * (float(r[3].rstrip("%")) + d) / float(r[1]) for d in (-0.5, 0.5))
        assert low - 1 <= float(r[4]) <= high + 1, r
    header, *ratios = _table(text, "## Ratios")
    names = [r[0] for r in ratios]
    assert "service@4 / offline pipeline (img/s)" in names
    assert "service 1-client p50 / offline single-image p50 (ms)" in names
    assert "service peak / naive peak (img/s)" in names
    assert "service@4 / ort@4 (img/s)" in names
    assert "ort 1-client p50 / service 1-client p50 (ms)" in names
    assert all(float(r[1]) > 0 for r in ratios)


def test_json_dump(bench_run: tuple[int, Path]) -> None:
    _, out = bench_run
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["model"] == "resnet20_cifar10"
    assert doc["meta"]["model_info"]["arch"] == "resnet20_cifar10"
    steps = doc["steps"]
    assert [(s["system"], s["concurrency"]) for s in steps] == [
        ("service", 1), ("service", 4), ("ort", 1), ("ort", 4), ("naive", 1), ("naive", 4),
    ]  # fmt: skip
    for s in steps:
        assert s["errors"] == {}
        assert s["ok"] == REQUESTS
        assert len(s["latencies_ms"]) == s["ok"]
        assert s["img_s"] == pytest.approx(s["ok"] / s["window_s"])
        assert s["server_cpu_s"] is not None
    offline = doc["offline"]
    assert offline["max_batch"] == 32
    for name in ("ort_batch1", "ort_max_batch", "decode_single", "decode_pool", "pipeline"):
        assert offline[name]["img_s"] > 0
        # The best of the two rounds is the figure.
        assert len(offline[name]["rounds_img_s"]) == 2
        assert offline[name]["img_s"] == max(offline[name]["rounds_img_s"])
    assert len(offline["single_image"]["op_ms"]) >= 16
    assert {r["name"] for r in doc["ratios"]} >= {"service peak / naive peak (img/s)"}


def test_plot_and_server_logs(bench_run: tuple[int, Path]) -> None:
    _, out = bench_run
    with Image.open(out / "results.png") as img:
        assert img.format == "PNG"
        assert img.width > 800 and img.height > 300
    for log in ("service.log", "naive.log", "ort.log"):
        assert (out / log).exists()


def test_own_images_and_the_aiohttp_client(
    cifar_repository: Path, cifar_test: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """``--images`` with the CIFAR test set's layout (each sent as a PNG), loaded by aiohttp."""
    np.savez(tmp_path / "eight.npz", images=cifar_test["images"][:8])
    out = tmp_path / "out"
    rc = main([
        "--start-server", "--repository", str(cifar_repository), "--model", "resnet20_cifar10",
        "--images", str(tmp_path / "eight.npz"), "--client", "aiohttp", "--no-offline",
        "--concurrency", "2", "--requests", str(REQUESTS), "--warmup", "0.3",
        "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    text = (out / "results.md").read_text()
    assert f"images from `{tmp_path / 'eight.npz'}` (8 PNG), client aiohttp" in text
    (row,) = _table(text, "## HTTP load")[1:]
    assert row[:2] == ["resnet-serve", "2"] and row[7] == "0"
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["client"] == "aiohttp"
    assert meta["corpus"]["formats"] == {"png": 8} and meta["corpus"]["count"] == 8
    (tmp_path / "empty").mkdir()
    argv = ["--url", "http://127.0.0.1:9", "--model", "m", "--images", str(tmp_path / "empty")]
    assert main(argv) == 2


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--start-server", "--out", str(tmp_path)]) == 2
    assert "--start-server needs --repository and --model" in capsys.readouterr().err
    argv = ["--url", "http://127.0.0.1:9", "--model", "m", "--baseline", "--endpoint", "embed"]
    assert main(argv) == 2
    assert "--baseline needs --repository" in capsys.readouterr().err


def test_rounds_pair_the_service_with_the_pipeline_of_each_round(
    cifar_repository: Path, tmp_path: Path
) -> None:
    pytest.importorskip("skimage")
    rc = main([
        "--start-server", "--repository", str(cifar_repository), "--model", "resnet20_cifar10",
        "--concurrency", "4", "--requests", str(REQUESTS), "--warmup", "0.3", "--rounds", "2",
        "--offline-seconds", "0.1", "--offline-rounds", "1", "--corpus-size", "16",
        "--corpus-dir", str(tmp_path / "corpus"), "--ratio-concurrency", "4",
        "--out", str(tmp_path / "out"), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    rows = {r[0]: r for r in _table((tmp_path / "out" / "results.md").read_text(), "## Ratios")}
    row = rows["service@4 / offline pipeline (img/s), paired rounds"]
    assert float(row[1]) > 0
    assert re.fullmatch(
        r"median of 2: [0-9.]+, [0-9.]+ \(pipeline img/s by round: [0-9.]+, [0-9.]+\)", row[2]
    ), row
