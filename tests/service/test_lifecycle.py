"""Readiness, timeouts, disconnects and shutdown, over real HTTP against uvicorn.

These servers run in a thread of the test process so that a test can hold a session
(make warmup or inference slow) and observe what the service does meanwhile."""

from __future__ import annotations

import gc
import re
import signal
import socket
import threading

import httpx
import numpy as np
import pytest

from resnet_serve.service.metrics import Metrics
from resnet_serve.service.runtime import Runtime
from resnet_serve.service.settings import Settings
from tests.service import tiny
from tests.service.servers import (
    ProcessServer,
    ThreadServer,
    busy_server,
    hold,
    metric_value,
    png,
    wait_until,
)

PNG = {"content-type": "image/png"}


def test_readiness_before_and_after_warmup(tiny_repository, tiny_pngs) -> None:
    settings = Settings(repository=tiny_repository)
    runtime = Runtime.load(settings, Metrics())
    gate = hold(runtime, "warmup")
    srv = ThreadServer(settings, runtime).start(wait_ready=False)
    try:
        assert httpx.get(srv.url + "/healthz").status_code == 200
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503 and r.json()["models"] == {tiny.NAME: False}
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[0], headers=PNG)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "retry-after" in r.headers
        gate.set()
        wait_until(lambda: httpx.get(srv.url + "/readyz").status_code == 200, timeout=30)
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[0], headers=PNG)
        assert r.status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_the_server_process_freezes_its_heap_once_ready(tiny_repository, tiny_pngs) -> None:
    # resnet-serve has its process to itself: what it built before ready is frozen, out of
    # the collector's full collections (their cost under load: docs/benchmarks.md).
    srv = ProcessServer(tiny_repository, log_level="debug").start()
    try:
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[0], headers=PNG)
        assert r.status_code == 200
        (frozen,) = re.findall(r"heap frozen: (\d+) objects", srv.output())
        assert int(frozen) > 10_000  # modules, sessions, routes: tens of thousands
    finally:
        assert srv.stop() == 0


def test_a_runtime_sharing_the_interpreter_leaves_its_heap_alone(tiny_repository) -> None:
    # In-process (tests, an application embedding the service) nothing is frozen: the
    # host's own garbage would never be collected.
    before = gc.get_freeze_count()
    srv = ThreadServer(Settings(repository=tiny_repository)).start()
    try:
        assert gc.get_freeze_count() == before
    finally:
        srv.stop()


def test_warmup_stops_between_batch_sizes(tiny_repository) -> None:
    runtime = Runtime.load(Settings(repository=tiny_repository), Metrics())
    model = runtime.models[tiny.NAME]
    (worker,) = model.pool.workers
    stop, sizes = threading.Event(), []
    real = worker.run

    def run(images: np.ndarray, *args):  # type: ignore[no-untyped-def]
        sizes.append(len(images))
        if len(sizes) == 3:
            stop.set()
        return real(images, *args)

    worker.run = run  # type: ignore[method-assign]
    model.pool.warmup(model.buckets, model.spec.input_shape, stop)
    assert sizes == [1, 2, 3]


def test_stopping_during_warmup_does_not_wait_for_it(tiny_repository) -> None:
    settings = Settings(repository=tiny_repository)
    runtime = Runtime.load(settings, Metrics())
    gate = hold(runtime, "run")  # the first warmup run lasts HOLD_TIMEOUT_S (120 s)
    srv = ThreadServer(settings, runtime).start(wait_ready=False)
    try:
        assert gate.entered.wait(60)  # a warmup run is in progress, held
        srv.stop()  # joins the server's thread for up to 30 s, far less than the run lasts
        assert not srv.thread.is_alive()
    finally:
        gate.set()


def test_504_and_timed_out_work_is_dropped(tiny_repository, tiny_pngs) -> None:
    # The holder must reach the session within the timeout too (a few ms, normally): 2 s
    # leaves a busy machine ample room, and is still far less than the hold lasts.
    with busy_server(tiny_repository, tiny_pngs[0], request_timeout_ms=2000) as (srv, answers):
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[1], headers=PNG, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert answers[0].status_code == 504  # the holder too: held until after that 504
    # The second request's image was still queued when it timed out: never computed.
    text = _metrics_after(srv)
    assert metric_value(text, "resnet_serve_rejected_images_total", reason="cancelled") >= 1
    assert metric_value(text, "resnet_serve_batch_size_sum") == 1
    assert metric_value(text, "resnet_serve_requests_total", status="504") == 2


@pytest.mark.parametrize("guarded", [True, False], ids=["our-connections", "plain-uvicorn"])
def test_work_of_a_disconnected_client_is_dropped(tiny_repository, tiny_pngs, guarded) -> None:
    # Ours: the connection's disconnect future; plain uvicorn: the watch reads the ASGI
    # disconnect message (service/httpcall.py).
    with busy_server(tiny_repository, tiny_pngs[0], guarded=guarded) as (srv, _):
        body = tiny_pngs[1]
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            # Close only once the image is decoded and queued behind the held session.
            wait_until(lambda: _queue_depth(srv) == 1, timeout=60)
        wait_until(
            lambda: metric_value(
                httpx.get(srv.url + "/metrics").text,
                "resnet_serve_rejected_images_total", reason="client_gone",
            ) == 1,
            timeout=60,
        )  # fmt: skip
    assert metric_value(_metrics_after(srv), "resnet_serve_batch_size_sum") == 1  # the holder's


def _queue_depth(srv: ThreadServer) -> float:
    return metric_value(httpx.get(srv.url + "/metrics").text, "resnet_serve_queue_depth")


def _metrics_after(srv: ThreadServer) -> str:
    """The metrics of a stopped in-thread server, read from its registry."""
    from prometheus_client import generate_latest

    return generate_latest(srv.runtime.metrics.registry).decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signal_finishes_accepted_requests_and_exits_0(tiny_repository, tiny_images, sig) -> None:
    srv = ProcessServer(tiny_repository, holdable=True).start()
    assert srv.proc is not None
    images = [png(np.ascontiguousarray(im)) for im in tiny_images[:64]]
    results: list[int] = []

    def client(i: int) -> None:
        files = [("file", (f"{j}.png", images[j])) for j in range(64)]
        try:
            r = httpx.post(srv.url + "/v1/classify", files=files, timeout=60)
            results.append(r.status_code)
        except httpx.TransportError:
            results.append(-1)  # refused: never accepted

    # The signal comes while a batch of accepted images is in the session, held there:
    # at least one request is in flight when it arrives, however fast this machine is.
    srv.hold()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(srv.entered, timeout=60)
        srv.proc.send_signal(sig)  # once: a second Ctrl-C would quit without draining
    finally:
        srv.release()
    try:
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop(signal.SIGKILL)  # if it did not exit
    for t in threads:
        t.join(60)
    assert len(results) == 8
    assert all(code in (200, -1) for code in results), results
    assert 200 in results
