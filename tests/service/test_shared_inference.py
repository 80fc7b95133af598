"""``--workers N --shared-inference``: one inference process holds the sessions and runs
the workers' batches (service/inference_host.py, service/remote.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from resnet_serve.service.devices import Device
from resnet_serve.service.inference_host import InferenceHost
from resnet_serve.service.remote import RemoteInferenceError, RemoteRunner, load_pool
from resnet_serve.service.repository import discover
from resnet_serve.service.sessions import DEFAULT_OUTPUTS, SessionPool
from resnet_serve.service.settings import Settings, cpu_count
from tests.service import tiny
from tests.service.servers import (
    ProcessServer,
    alive,
    children,
    classify_each,
    thread_server,
    wait_until,
)

MODEL = tiny.NAME
ALL_OUTPUTS = ("logits", "embedding", "layer1")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Unix sockets and /proc")


@pytest.fixture
def host(tiny_repository: Path) -> Iterator[tuple[InferenceHost, str]]:
    """An inference host in this process, on a socket in a short directory of its own (a
    Unix socket's path is limited to about 100 bytes, too few for pytest's tmp_path)."""
    settings = Settings(repository=tiny_repository, tuning="off")
    served = InferenceHost.load(settings)
    directory = tempfile.mkdtemp(prefix="rs-test-")
    path = os.path.join(directory, "s")
    thread = threading.Thread(target=served.serve, args=(path,), daemon=True)
    thread.start()
    try:
        yield served, path
    finally:
        served.stop(path)
        thread.join(10)
        shutil.rmtree(directory, ignore_errors=True)


def _runner(path: str, model: str = MODEL) -> RemoteRunner:
    return RemoteRunner(path, model, Device("cpu"), f"remote-{model}", "CPUExecutionProvider")


def test_remote_runs_match_local_runs(
    host: tuple[InferenceHost, str], tiny_repository: Path, tiny_images: np.ndarray
) -> None:
    _, path = host
    spec = discover(tiny_repository, [MODEL])[0]
    local = SessionPool.load(spec, Settings(repository=tiny_repository)).workers[0]
    runner = _runner(path)
    for batch in (tiny_images[:1], tiny_images[:7], tiny_images[:32]):
        for names in (DEFAULT_OUTPUTS, ALL_OUTPUTS, ("layer1",)):
            got, want = runner.run(batch, names), local.run(batch, names)
            assert len(got) == len(want) == len(names)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape
                assert np.array_equal(g, w)
                assert g.flags.writeable  # as onnxruntime's own arrays are
    # The pool a worker builds: as many runners as the host has sessions, its device.
    pool = load_pool(spec, Settings(repository=tiny_repository), path)
    assert len(pool.workers) == 1 and pool.workers[0].device == Device("cpu")
    assert pool.buckets == list(range(1, 33))


def test_concurrent_calls_are_batched_together_and_get_their_own_rows(
    host: tuple[InferenceHost, str], tiny_images: np.ndarray
) -> None:
    served, path = host
    queue = served.queues[MODEL]
    (worker,) = queue.pool.workers
    real_run = worker.run
    sizes: list[int] = []
    gate, entered = threading.Event(), threading.Event()

    def held_run(
        images: np.ndarray, names: tuple[str, ...] = DEFAULT_OUTPUTS, busy: bool = False
    ) -> list:  # type: ignore[type-arg]
        sizes.append(len(images))
        entered.set()
        assert gate.wait(60)
        return real_run(images, names, busy)

    worker.run = held_run  # type: ignore[method-assign]
    # Different images and sizes per caller: a row handed to the wrong caller shows.
    chunks = [tiny_images[0:1], tiny_images[1:4], tiny_images[4:9], tiny_images[9:11],
              tiny_images[11:17], tiny_images[17:18]]  # fmt: skip
    runners = [_runner(path) for _ in chunks]
    with ThreadPoolExecutor(len(chunks)) as pool:
        first = pool.submit(runners[0].run, chunks[0], ALL_OUTPUTS)
        assert entered.wait(30)  # the session is busy with the first call
        rest = [
            pool.submit(r.run, c, ALL_OUTPUTS) for r, c in zip(runners[1:], chunks[1:], strict=True)
        ]
        wait_until(lambda: queue.waiting == len(rest), timeout=30)
        gate.set()
        results = [first.result(30), *(f.result(30) for f in rest)]
    # One run for the first call, then one for all that waited behind it.
    assert sizes == [1, sum(len(c) for c in chunks[1:])]
    for chunk, arrays in zip(chunks, results, strict=True):
        want = tiny.expected(chunk)
        for name, got in zip(ALL_OUTPUTS, arrays, strict=True):
            np.testing.assert_allclose(got, want[name], rtol=1e-4, atol=1e-5)


def test_errors_reach_the_caller(host: tuple[InferenceHost, str], tiny_images: np.ndarray) -> None:
    served, path = host
    with pytest.raises(RemoteInferenceError, match="not served"):
        _runner(path, "nope").run(tiny_images[:1])
    runner = _runner(path)
    with pytest.raises(RemoteInferenceError, match="layer9"):
        runner.run(tiny_images[:2], ("layer9",))
    # The same connection still serves after an error.
    np.testing.assert_allclose(runner.run(tiny_images[:2], ("embedding",))[0],
                               tiny.expected(tiny_images[:2])["embedding"], atol=1e-5)  # fmt: skip
    # The inference process gone: runs fail, and the pool's recovery fails too (the runner
    # is retired) instead of waiting for a process that will not come back.
    served.stop(path)
    with pytest.raises(RemoteInferenceError):
        runner.run(tiny_images[:1])
    with pytest.raises(RemoteInferenceError):
        runner.recreate()


def test_workers_decode_with_their_share_of_the_cores() -> None:
    from resnet_serve.service.workers import split_threads

    env = split_threads(Settings(workers=2, shared_inference=True))
    assert "RESNET_SERVE_INTRA_OP_THREADS" not in env  # the inference process's own choice
    assert env["RESNET_SERVE_DECODE_WORKERS"] == str(max(1, cpu_count() // 2))


def _is_host(pid: int) -> bool:
    return b"inference_host" in Path(f"/proc/{pid}/cmdline").read_bytes()


def _logs(srv: ProcessServer) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in srv.output().splitlines() if line.startswith("{")]


def test_workers_share_one_inference_process(tiny_repository: Path, tiny_pngs: list[bytes]) -> None:
    blobs = tiny_pngs[:16]
    with thread_server(tiny_repository) as single:
        expected = [p[0]["label"] for p in classify_each(single.url, MODEL, blobs)]
    srv = ProcessServer(tiny_repository, workers="2", shared_inference="true", log_level="info")
    srv.start()
    try:
        kids = children(srv.proc.pid)  # type: ignore[union-attr]
        assert len(kids) == 3 and sum(map(_is_host, kids)) == 1

        def top1(blob: bytes) -> str:
            # A client of its own each: a new connection, which the kernel gives a worker.
            r = httpx.post(srv.url + f"/v1/models/{MODEL}/classify", content=blob,
                           headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()["results"][0]["predictions"][0]["label"]

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(top1, blobs)) == expected
        info = httpx.get(srv.url + f"/v1/models/{MODEL}").json()
        assert info["inference"] == "shared process" and info["ready"]
    finally:
        code = srv.stop()
    assert code == 0, srv.output()
    assert not any(alive(pid) for pid in kids)
    docs = _logs(srv)
    # Sessions were created once, in the process without a worker index, with every core.
    created = [d for d in docs if "intra-op thread(s) each" in d["message"]]
    assert len(created) == 1, created
    assert "worker" not in created[0]
    assert f"1 session(s) on cpu, {cpu_count()} intra-op" in created[0]["message"]
    remote = [d for d in docs if "remote session(s)" in d["message"]]
    assert sorted(d["worker"] for d in remote) == [0, 1]
    assert sorted(d["worker"] for d in docs if d["message"] == "drained") == [0, 1]


def test_the_inference_process_dying_ends_the_service(tiny_repository: Path) -> None:
    srv = ProcessServer(tiny_repository, workers="2", shared_inference="true").start()
    kids = children(srv.proc.pid)  # type: ignore[union-attr]
    try:
        (host,) = [pid for pid in kids if _is_host(pid)]
        os.kill(host, signal.SIGKILL)
        assert srv.proc.wait(timeout=60) != 0  # type: ignore[union-attr]
    finally:
        srv.stop(signal.SIGKILL)  # a supervisor that did not notice: its workers follow it
    wait_until(lambda: not any(alive(pid) for pid in kids), timeout=60)
