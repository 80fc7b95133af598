"""The load generator's bookkeeping, against a real server."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.bench import rawhttp
from resnet_serve.bench.load import (
    StepResult,
    Target,
    check_answer,
    parse_metrics,
    request_bodies,
    run_step,
)
from tests.service.servers import ThreadServer, encode, thread_server


@pytest.fixture(scope="module")
def server(cifar_repository: Path) -> Iterator[ThreadServer]:
    with thread_server(cifar_repository, models="resnet20_cifar10") as srv:
        yield srv


@pytest.fixture(scope="module")
def jpegs(cifar_test: dict[str, np.ndarray]) -> list[bytes]:
    return [encode(img, "JPEG", quality=90) for img in cifar_test["images"][:8]]


CLIENTS = pytest.mark.parametrize("client", ["raw", "aiohttp"])


def _run(target: Target, bodies: list[bytes], concurrency: int, **kw: object) -> StepResult:
    return rawhttp.run(
        run_step(target, bodies, concurrency, warmup_s=0.1, timeout_s=30, **kw)  # type: ignore[arg-type]
    )


def test_step_statistics() -> None:
    s = StepResult("service", 4, 16, 2.0, 100, {"503": 3}, [float(i) for i in range(1, 101)], 0.1)
    assert s.req_s == 50.0
    assert s.img_s == 800.0
    assert s.percentile(50) == pytest.approx(50.5)
    assert s.percentile(99) == pytest.approx(99.01)
    assert s.error_count == 3
    empty = StepResult("service", 1, 1, 1.0, 0, {"404": 5}, [], 0.0)
    assert empty.img_s == 0.0
    assert math.isnan(empty.percentile(50))


def test_bodies_cover_the_corpus_in_multipart_parts() -> None:
    corpus = [bytes([i]) * 10 for i in range(10)]
    bodies = request_bodies(corpus, 3)
    assert len(bodies) == 3
    assert all(b.count(b'name="file"') == 3 for b in bodies)
    assert {bytes([i]) * 10 in b"".join(bodies) for i in range(9)} == {True}
    assert len(request_bodies(corpus, 16)) == 1  # more images per request than the corpus


def test_parts_name_their_image_type(jpegs: list[bytes], cifar_test: dict[str, np.ndarray]) -> None:
    png = encode(cifar_test["images"][0], "PNG")
    body = request_bodies([png, jpegs[0]], 2)[0]
    assert b'filename="0.png"\r\nContent-Type: image/png\r\n' in body
    assert b'filename="1.jpg"\r\nContent-Type: image/jpeg\r\n' in body


@CLIENTS
def test_requests_mode_counts_exactly_and_the_service_reads_every_part(
    server: ThreadServer, jpegs: list[bytes], client: str
) -> None:
    url = server.url + "/v1/models/resnet20_cifar10/classify"
    target = Target(
        "service", url, 4, metrics_url=server.url + "/metrics", model="resnet20_cifar10"
    )
    bodies = request_bodies(jpegs, 4)
    result = _run(target, bodies, 2, duration_s=None, requests=25, client=client)
    assert result.errors == {}
    assert result.ok == 25
    assert len(result.latencies_ms) == 25
    assert result.img_s > 0
    assert result.server_cpu_s is None  # no process id given for an in-process server
    # Batches that ran during the window; requests straddling its ends make it inexact.
    assert result.batches is not None and result.batches["images"] >= 4
    assert result.mean_batch is not None and 1 <= result.mean_batch <= 32


def test_parse_metrics() -> None:
    text = """# HELP resnet_serve_batch_size Images per executed batch (padding excluded)
resnet_serve_batch_size_bucket{le="1.0",model="a"} 3.0
resnet_serve_batch_size_count{model="a"} 10.0
resnet_serve_batch_size_sum{model="a"} 40.0
resnet_serve_batch_size_count{model="b"} 2.0
resnet_serve_batch_size_sum{model="b"} 8.0
resnet_serve_batch_padding_images_total{model="a"} 6.0
resnet_serve_inference_duration_seconds_sum{model="a"} 1.5
"""
    assert parse_metrics(text) == {
        "batches": 12.0, "images": 48.0, "padding": 6.0, "inference_s": 1.5,
    }  # fmt: skip
    assert parse_metrics(text, "a") == {
        "batches": 10.0, "images": 40.0, "padding": 6.0, "inference_s": 1.5,
    }  # fmt: skip


@CLIENTS
def test_errors_are_counted_by_status(
    server: ThreadServer, jpegs: list[bytes], client: str
) -> None:
    target = Target("service", server.url + "/v1/models/no_such_model/classify", 1)
    bodies = request_bodies(jpegs, 1)
    result = _run(target, bodies, 2, duration_s=None, requests=10, client=client)
    assert result.ok == 0
    assert result.errors == {"404": 10}
    assert result.img_s == 0.0


@CLIENTS
def test_a_wrong_answer_is_an_error(server: ThreadServer, jpegs: list[bytes], client: str) -> None:
    # Two images sent where the target expects three: the one checked answer (the first
    # measured) is refused, the others are taken as they come.
    target = Target("service", server.url + "/v1/models/resnet20_cifar10/classify", 3)
    result = _run(target, request_bodies(jpegs, 2), 1, duration_s=None, requests=5, client=client)
    assert result.errors == {"invalid-answer": 1}
    assert result.ok == 4


def test_answers_are_checked() -> None:
    classify = Target("service", "http://unused/v1/classify", 3)
    assert check_answer(b'{"results": [1, 2]}', classify) == "expected 3 results"
    target = Target("service", "http://unused/v1/embed", 2, endpoint="embed")
    assert check_answer(b'{"embeddings": ["a", "b"]}', target) is None
    assert check_answer(b'{"results": [1, 2]}', target) == "expected 2 embeddings"
    assert check_answer(b"not json", target) == "invalid JSON"


@pytest.mark.parametrize("from_thread", [False, True])
def test_process_cpu_counts_the_children(from_thread: bool) -> None:
    """A server started with --workers does its work in child processes; a framework's may
    be started by another thread than the main one (a JVM's, Ray's raylet's)."""
    import subprocess
    import sys

    from resnet_serve.bench.load import children, process_cpu_s
    from tests.service.servers import wait_until

    burn = (
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
        "time.sleep(60)"
    )
    spawn = f"subprocess.Popen([sys.executable, '-c', {burn!r}]).wait()"
    if from_thread:
        spawn = f"t = threading.Thread(target=lambda: {spawn}); t.start(); t.join()"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, threading; {spawn}"])
    try:
        wait_until(lambda: len(children(parent.pid)) == 1, timeout=30)
        (child,) = children(parent.pid)
        wait_until(lambda: (process_cpu_s(child) or 0) >= 0.3, timeout=30)
        total, own_child = process_cpu_s(parent.pid), process_cpu_s(child)
        assert total is not None and own_child is not None
        assert total >= own_child >= 0.3
    finally:
        for pid in children(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=30)
