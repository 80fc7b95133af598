"""``--cpu-affinity``: which cores each session's threads get, and that they are pinned
there (the kernel's own record of each thread's allowed CPUs, /proc/self/task)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.service import affinity
from resnet_serve.service.repository import load_model_spec
from resnet_serve.service.sessions import SessionPool
from resnet_serve.service.settings import Settings
from resnet_serve.service.workers import COUNT_ENV, WORKER_ENV
from tests.service import tiny

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")


def test_workers_get_slices_of_the_cpus() -> None:
    cpus = [2, 3, 5, 7, 8, 9]
    assert affinity.share(cpus, 0, 1) == cpus
    assert [affinity.share(cpus, i, 2) for i in range(2)] == [[2, 3, 5], [7, 8, 9]]
    assert [affinity.share(cpus, i, 4) for i in range(4)] == [[2], [3, 5], [7], [8, 9]]
    # More workers than CPUs: one each, round-robin.
    assert [affinity.share(cpus[:2], i, 3) for i in range(3)] == [[2], [3], [2]]


def test_sessions_take_consecutive_cores_and_wrap() -> None:
    cpus = [0, 1, 2, 3]
    assert affinity.session_cores(cpus, 0, 2) == [0, 1]
    assert affinity.session_cores(cpus, 1, 2) == [2, 3]
    assert affinity.session_cores(cpus, 2, 3) == [2, 3, 0]
    # The caller's core is ours to pin; onnxruntime gets the others, numbered from 1.
    assert affinity.pool_affinities([2, 3, 0]) == "4;1"
    assert affinity.pool_affinities([5]) == ""


def test_a_worker_pins_within_its_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = affinity.allowed_cpus()
    assert cpus == sorted(os.sched_getaffinity(0))
    monkeypatch.delenv(WORKER_ENV, raising=False)
    assert affinity.process_cpus() == cpus
    monkeypatch.setenv(WORKER_ENV, "1")
    monkeypatch.setenv(COUNT_ENV, "2")
    assert affinity.process_cpus() == affinity.share(cpus, 1, 2)


def _thread_cpus() -> dict[int, str]:
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread (an earlier test's) that ended meanwhile
            continue
        line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
        out[int(task.name)] = line.split(":", 1)[1].strip()
    return out


@pytest.mark.parametrize("pinned", [True, False])
def test_session_threads_are_pinned(
    tiny_repository: Path, tiny_images: np.ndarray, pinned: bool
) -> None:
    spec = load_model_spec(tiny_repository / tiny.NAME)
    settings = Settings(
        cpu_affinity=pinned, sessions_per_device=2, intra_op_threads=2, tuning="off"
    )
    before = set(_thread_cpus())
    pool = SessionPool.load(spec, settings)
    try:
        cpus = affinity.allowed_cpus()

        def new() -> Counter[str]:
            return Counter(cpu for tid, cpu in _thread_cpus().items() if tid not in before)

        if not pinned:
            assert all(w.cpu is None for w in pool.workers)  # type: ignore[attr-defined]
            # Every new thread may run wherever this one may.
            assert set(new()) == {_thread_cpus()[threading.get_native_id()]}
            return
        expected: Counter[str] = Counter()
        for i, worker in enumerate(pool.workers):
            cores = affinity.session_cores(cpus, i, 2)
            assert worker.cpu == cores[0]  # type: ignore[attr-defined]
            ran_on = worker.executor.submit(os.sched_getaffinity, 0).result()
            assert ran_on == {cores[0]}
            # The spinning session and its non-spinning copy, on the same cores (never
            # running at once: one thread runs both).
            copies = [worker.options, worker.calm_options]  # type: ignore[attr-defined]
            for options in copies:
                assert options.get_session_config_entry(
                    "session.intra_op_thread_affinities"
                ) == affinity.pool_affinities(cores)
            expected[str(cores[0])] += 1  # the worker's own thread
            expected[str(cores[1])] += 2  # each copy's pool thread, pinned by onnxruntime
        # Every thread the sessions started is pinned where it was meant to be (onnxruntime's
        # threads pin themselves once started: a moment after the session exists).
        deadline = time.monotonic() + 5
        while new() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert new() == expected
        # And they still compute.
        worker = pool.workers[1]
        assert worker.executor.submit(worker.run, tiny_images[:3]).result()
    finally:
        pool.close()
