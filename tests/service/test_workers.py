"""``--workers N``: processes sharing the port, metrics summed across them, one drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.service import tiny
from tests.service.servers import (
    ProcessServer,
    alive,
    children,
    free_port,
    metric_value,
    png,
    wait_until,
)

MODEL = tiny.NAME
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and /proc")


def _answered_per_process(metrics_dir: Path) -> Counter[int]:
    """Successful classify answers by worker pid, read from each worker's own file."""
    out: Counter[int] = Counter()
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, labels, _ = json.loads(key)
            if sample == "resnet_serve_requests_total" and labels == {
                "endpoint": "classify", "model": MODEL, "status": "200"
            }:  # fmt: skip
                out[pid] += int(value)
    return out


def test_requests_spread_over_workers_and_metrics_add_up(
    tiny_repository: Path, tiny_images: np.ndarray, tmp_path: Path
) -> None:
    image = png(tiny_images[0])
    # Every worker gives the graph's answer for it.
    label = tiny.LABELS[int(np.argmax(tiny.expected(tiny_images[:1])["logits"][0]))]
    srv = ProcessServer(tiny_repository, workers="2")
    srv.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    srv.start()
    try:
        workers = children(srv.proc.pid)  # type: ignore[union-attr]
        assert len(workers) == 2
        n = 40
        for _ in range(n):  # a new connection each: the kernel picks a worker for each
            r = httpx.post(
                srv.url + f"/v1/models/{MODEL}/classify", content=image,
                headers={"content-type": "image/png"},
            )  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["predictions"][0]["label"] == label
        # A request is counted after its answer is sent: the last ones may land just after
        # the client has it (a tiny model answers fast enough to see that).
        wait_until(lambda: sum(_answered_per_process(tmp_path).values()) >= n, timeout=10)
        per_worker = _answered_per_process(tmp_path)
        assert set(per_worker) == set(workers)
        assert all(v > 0 for v in per_worker.values()), per_worker
        assert sum(per_worker.values()) == n
        # Whichever worker answers the scrape, it reports the service's totals.
        for _ in range(6):
            text = httpx.get(srv.url + "/metrics").text
            assert metric_value(text, "resnet_serve_requests_total", endpoint="classify",
                                model=MODEL, status="200") == n  # fmt: skip
            assert metric_value(text, "resnet_serve_sessions", model=MODEL) == 2
            assert metric_value(text, "resnet_serve_model_ready", model=MODEL) == 1
            assert metric_value(text, "resnet_serve_max_batch_size", model=MODEL) == 32
            hist = metric_value(text, "resnet_serve_request_duration_seconds_count",
                                endpoint="classify", model=MODEL, status_class="2xx")  # fmt: skip
            assert hist == n
    finally:
        assert srv.stop() == 0
    for pid in workers:
        assert not alive(pid)
    # The supervisor's own directory is the operator's here: kept, but no worker is live.
    assert not list(tmp_path.glob("gauge_live*"))


def test_sigterm_drains_every_worker(tiny_repository: Path, tiny_images: np.ndarray) -> None:
    image = png(tiny_images[1])
    srv = ProcessServer(tiny_repository, holdable=True, workers="2", log_level="info").start()
    workers = children(srv.proc.pid)  # type: ignore[union-attr]
    answers: list[int] = []
    n = 8

    def send() -> None:
        r = httpx.post(
            srv.url + f"/v1/models/{MODEL}/classify", content=image,
            headers={"content-type": "image/png"}, timeout=120,
        )  # fmt: skip
        answers.append(r.status_code)

    srv.hold()
    clients = [threading.Thread(target=send) for _ in range(n)]
    try:
        for t in clients:
            t.start()

        def all_in() -> bool:
            text = httpx.get(srv.url + "/metrics").text
            return metric_value(text, "resnet_serve_requests_in_flight") >= n + 1  # + scrape

        wait_until(all_in, timeout=60)
        assert srv.entered()
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(0.5)
        assert srv.proc.poll() is None  # type: ignore[union-attr]  # waiting for the drain
    finally:
        srv.release()
        for t in clients:
            t.join(120)
    assert answers == [200] * n
    assert srv.stop() == 0
    assert not any(alive(pid) for pid in workers)
    drained = [
        doc for line in srv.output().splitlines() if line.startswith("{")
        for doc in [json.loads(line)] if doc["message"] == "drained"
    ]  # fmt: skip
    assert sorted(d["worker"] for d in drained) == [0, 1]
    # Each worker answered what it accepted, and together every request (the probes'
    # paths are not API requests).
    assert all(d["accepted"] == d["answered"] for d in drained)
    assert sum(d["answered"] for d in drained) == n


def test_a_worker_that_dies_ends_the_service(tiny_repository: Path) -> None:
    srv = ProcessServer(tiny_repository, workers="2").start()
    workers = children(srv.proc.pid)  # type: ignore[union-attr]
    os.kill(workers[0], signal.SIGKILL)
    assert srv.proc.wait(timeout=60) == 128 + signal.SIGKILL  # type: ignore[union-attr]
    wait_until(lambda: not alive(workers[1]), timeout=60)


def test_port_in_use(tiny_repository: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "resnet_serve.service.cli", "--repository", str(tiny_repository),
             "--port", str(port), "--workers", "2"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "cannot listen" in proc.stderr


def test_ports_another_servers_workers_share_are_in_use(tiny_repository: Path) -> None:
    # Was: SO_REUSEPORT let a second --workers server join the first's ports, and each
    # took about half of the other's connections (with its own settings, API keys...).
    grpc_port = free_port()
    first = ProcessServer(tiny_repository, workers="2", grpc_port=str(grpc_port)).start()
    try:
        cases = ((first.port, 0, "--port"), (free_port(), grpc_port, "--grpc-port"))
        for port, grpc, option in cases:
            proc = subprocess.run(
                [sys.executable, "-m", "resnet_serve.service.cli", "--repository",
                 str(tiny_repository), "--port", str(port), "--grpc-port", str(grpc),
                 "--workers", "2"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert proc.returncode == 3, proc.stderr
            taken = port if grpc == 0 else grpc
            assert f"cannot listen on 127.0.0.1:{taken}" in proc.stderr and option in proc.stderr
        assert len(children(first.proc.pid)) == 2  # type: ignore[union-attr]
    finally:
        assert first.stop() == 0


class _Proc:
    """A worker process that ends when signalled."""

    pids = iter(range(10**6, 2 * 10**6))
    started: ClassVar[list[_Proc]] = []
    on_first: ClassVar[Callable[[], None] | None] = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.pid = next(self.pids)
        self.signals: list[int] = []
        self.returncode: int | None = None
        _Proc.started.append(self)
        if len(_Proc.started) == 1 and _Proc.on_first is not None:
            _Proc.on_first()  # the signal arrives while this one starts

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.returncode = -sig

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None, "never signalled: the supervisor would hang"
        return self.returncode


def test_a_stop_signal_while_workers_start_stops_them_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Was: a SIGTERM during the start loop reached only the workers started before it;
    # the loop went on, and the supervisor waited forever for the late ones.
    from resnet_serve.service import workers as workers_mod
    from resnet_serve.service.settings import Settings

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    monkeypatch.setattr(workers_mod.subprocess, "Popen", _Proc)
    monkeypatch.setattr(workers_mod.signal, "signal", lambda *a: None)  # not this process's
    supervisor = workers_mod.Supervisor(Settings(workers=4, grpc_port=0), [])
    _Proc.started, _Proc.on_first = [], lambda: supervisor._forward(signal.SIGTERM, None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert supervisor.run(sock) == 0  # stopped as asked: a clean exit
    (only,) = _Proc.started  # no worker started after the signal
    assert only.signals == [signal.SIGTERM]  # passed on once: a second would skip the drain


def test_a_worker_whose_model_broke_makes_every_worker_not_ready(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Was: readiness latched once every worker had been ready, so the healthy workers kept
    # answering 200 while the broken one answered 503: /readyz flapped by connection.
    from resnet_serve.service import workers as workers_mod

    monkeypatch.setenv(workers_mod.READY_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(workers_mod.COUNT_ENV, "2")
    monkeypatch.setenv(workers_mod.WORKER_ENV, "0")
    workers_mod.mark_ready()
    assert not workers_mod.peers_ready()  # worker 1 still loading
    (tmp_path / "1").touch()  # worker 1 ready
    assert workers_mod.peers_ready()
    workers_mod.mark_ready(False)  # this worker's model lost its last session
    assert not workers_mod.peers_ready()
    workers_mod.mark_ready(False)  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_one_process_with_a_multiprocess_directory_starts_from_zero(
    tiny_repository: Path, tiny_images: np.ndarray, tmp_path: Path
) -> None:
    # Was: outside --workers nothing cleared the operator's directory, so a restart
    # reported the last run's counters, and dead processes' gauges in its live sums.
    image = png(tiny_images[0])

    def run(requests: int) -> tuple[float, float]:
        srv = ProcessServer(tiny_repository, grpc_port="0")
        srv.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
        srv.start()
        try:
            for _ in range(requests):
                r = httpx.post(srv.url + f"/v1/models/{MODEL}/classify", content=image,
                               headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
                assert r.status_code == 200
            text = httpx.get(srv.url + "/metrics").text
            answered = metric_value(
                text, "resnet_serve_requests_total", endpoint="classify", model=MODEL,
                status="200",
            )  # fmt: skip
            return answered, metric_value(text, "resnet_serve_sessions", model=MODEL)
        finally:
            srv.stop(signal.SIGKILL)  # no clean-up of its own at exit

    assert run(3) == (3, 1)
    assert run(2) == (2, 1)


def test_exit_codes_of_processes_that_end() -> None:
    from resnet_serve.service.settings import Settings
    from resnet_serve.service.workers import Supervisor

    supervisor = Supervisor(Settings(workers=2, grpc_port=0), [])
    assert supervisor._exit_code(3) == 3
    assert supervisor._exit_code(-signal.SIGKILL) == 137  # as a shell reports it
    assert supervisor._exit_code(-signal.SIGTERM) == 128 + signal.SIGTERM  # not asked to
    supervisor.stopping = True
    assert supervisor._exit_code(-signal.SIGTERM) == 0  # the stop it passed on


def test_cores_are_split_unless_given() -> None:
    from resnet_serve.service.settings import Settings, cpu_count
    from resnet_serve.service.workers import split_threads

    per = max(1, cpu_count() // 2)
    env = split_threads(Settings(workers=2))
    assert env == {
        "RESNET_SERVE_INTRA_OP_THREADS": str(per),
        "RESNET_SERVE_DECODE_WORKERS": str(per),
        "RESNET_SERVE_SESSIONS_PER_DEVICE": "1",
    }
    given = split_threads(Settings(workers=2, intra_op_threads=3, decode_workers=5))
    assert given == {"RESNET_SERVE_SESSIONS_PER_DEVICE": "1"}
    two = split_threads(Settings(workers=2, sessions_per_device=2))
    assert two["RESNET_SERVE_INTRA_OP_THREADS"] == str(max(1, per // 2))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_pinned_workers_keep_to_their_slices(tiny_repository: Path) -> None:
    """``--cpu-affinity`` with two workers: each one's session thread sits on a core of its
    own slice of the CPUs (the kernel's record of each thread: /proc/PID/task)."""
    from resnet_serve.service.affinity import allowed_cpus, share

    srv = ProcessServer(tiny_repository, workers="2", cpu_affinity="true").start()
    try:
        workers = children(srv.proc.pid)  # type: ignore[union-attr]
        assert len(workers) == 2
        cpus = allowed_cpus()
        firsts = set()
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            index = int(next(e for e in environ if e.startswith(b"_RESNET_SERVE_WORKER="))[21:])
            slice_ = share(cpus, index, 2)
            masks = set()
            for task in Path(f"/proc/{pid}/task").iterdir():
                lines = (task / "status").read_text().splitlines()
                masks.add(next(x for x in lines if x.startswith("Cpus_allowed_list:")).split()[1])
            # One intra-op thread per worker (the cores split): its own thread, on the
            # slice's first core; everything else free to run anywhere.
            assert str(slice_[0]) in masks, (index, masks)
            firsts.add(slice_[0])
        assert len(firsts) == min(2, len(cpus))
    finally:
        assert srv.stop() == 0
