"""Session options, IOBinding, and (where a GPU is present) CUDA against CPU."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from resnet_serve.service.devices import Device, providers_for
from resnet_serve.service.repository import load_model_spec
from resnet_serve.service.sessions import SessionPool
from resnet_serve.service.settings import Settings
from tests.service import tiny


def test_cuda_provider_options() -> None:
    s = Settings(
        cuda_conv_algo_search="HEURISTIC", cuda_prefer_nhwc=True, gpu_mem_limit_bytes=2**30
    )
    (name, opts), cpu = providers_for(Device("cuda", 1), s)
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts["device_id"] == "1" and opts["cudnn_conv_algo_search"] == "HEURISTIC"
    assert opts["prefer_nhwc"] == "1" and opts["gpu_mem_limit"] == str(2**30)
    assert "gpu_mem_limit" not in providers_for(Device("cuda"), Settings())[0][1]
    assert providers_for(Device("cpu"), s) == ["CPUExecutionProvider"]


def test_io_binding_gives_the_same_outputs(tiny_repository, tiny_images) -> None:
    spec = load_model_spec(tiny_repository / tiny.NAME)
    images = np.ascontiguousarray(tiny_images[:8])
    plain = SessionPool.load(spec, Settings(io_binding=False)).workers[0]
    bound = SessionPool.load(spec, Settings(io_binding=True)).workers[0]
    assert bound.io_binding and not plain.io_binding
    for a, b in zip(plain.run(images), bound.run(images), strict=True):
        np.testing.assert_array_equal(a, b)


def test_threads_are_split_between_sessions(tiny_repository) -> None:
    spec = load_model_spec(tiny_repository / tiny.NAME)
    pool = SessionPool.load(spec, Settings(sessions_per_device=2, intra_op_threads=1))
    assert len(pool.workers) == 2
    assert all(w.options.intra_op_num_threads == 1 for w in pool.workers)


@pytest.mark.parametrize("spin_under_load", [False, True])
def test_a_lone_batch_has_the_cores_the_sessions_split(
    tiny_repository, tiny_images, monkeypatch: pytest.MonkeyPatch, spin_under_load: bool
) -> None:
    # ResNet-50 tuned to 2 sessions x 1 thread served one client at 0.58x the throughput of
    # one 2-thread session (docs/benchmarks.md, ninth session): its batch ran on one core.
    from resnet_serve.service import sessions

    monkeypatch.setattr(sessions, "cpu_count", lambda: 4)
    spec = load_model_spec(tiny_repository / tiny.NAME)
    pool = SessionPool.load(spec, Settings(sessions_per_device=2, spin_under_load=spin_under_load))
    key = "session.intra_op.allow_spinning"
    lone = pool.workers[0].lone
    assert lone is not None and all(w.lone is lone for w in pool.workers)  # one, shared
    assert lone.options.intra_op_num_threads == 4  # every core, spinning
    assert lone.options.get_session_config_entry(key) == "1"
    for worker in pool.workers:
        assert worker.calm is None  # busy spells: its own share, spinning only if asked
        assert worker.options.intra_op_num_threads == 2
        assert worker.options.get_session_config_entry(key) == ("1" if spin_under_load else "0")
    worker = pool.workers[1]
    shared, own = Recording(lone.session), Recording(worker.session)
    lone.session, worker.session = shared, own  # type: ignore[assignment]
    images = np.ascontiguousarray(tiny_images[:4])
    for a, b in zip(worker.run(images), worker.run(images, busy=True), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (shared.runs, own.runs) == (1, 1)
    pool.warmup([1, 2], spec.input_shape)  # both warmed from every worker's thread
    assert (shared.runs, own.runs) == (1 + 2 * 2, 1 + 2)
    worker.recreate()  # after a failure: the shared one anew too
    assert lone.session is not shared and worker.session is not own


def test_the_shared_session_runs_one_batch_at_a_time(
    tiny_repository, tiny_images, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second lone batch (one the batcher counted as alone just before) runs on its own
    # worker's share instead of a second set of every-core threads on the shared session.
    from resnet_serve.service import sessions

    monkeypatch.setattr(sessions, "cpu_count", lambda: 4)
    spec = load_model_spec(tiny_repository / tiny.NAME)
    pool = SessionPool.load(spec, Settings(sessions_per_device=2))
    first, second = pool.workers
    lone = first.lone
    assert lone is not None

    class Held(Recording):
        entered, release = threading.Event(), threading.Event()

        def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.entered.set()
            assert self.release.wait(60)
            return super().run(*args, **kwargs)

    shared, own = Held(lone.session), Recording(second.session)
    lone.session, second.session = shared, own  # type: ignore[assignment]
    images = np.ascontiguousarray(tiny_images[:2])
    with ThreadPoolExecutor(1) as other:
        held = other.submit(first.run, images)
        assert shared.entered.wait(60)
        expected = own.session.run(list(sessions.DEFAULT_OUTPUTS), {sessions.INPUT: images})
        for a, b in zip(second.run(images), expected, strict=True):  # not blocked, not shared
            np.testing.assert_array_equal(a, b)
        assert (shared.runs, own.runs) == (0, 1)
        shared.release.set()
        held.result(60)
    assert shared.runs == 1
    second.run(images)  # free again: the shared session's
    assert (shared.runs, own.runs) == (2, 1)


@pytest.mark.parametrize(
    "args", [{}, {"sessions_per_device": 2, "cpu_affinity": True}, {"intra_op_threads": 2}]
)
def test_no_shared_session_where_the_sessions_do_not_split_the_cores(tiny_repository, args) -> None:
    spec = load_model_spec(tiny_repository / tiny.NAME)
    assert all(w.lone is None for w in SessionPool.load(spec, Settings(**args)).workers)


@pytest.mark.parametrize(("args", "spin"), [({}, "1"), ({"cpu_spinning": False}, "0")])
def test_threads_spin_unless_told_not_to(tiny_repository, args, spin) -> None:
    # On by default: sleeping threads made a run after a quiet spell up to 1.8x slower
    # (tools/cold_start.py); the option turns it off for machines shared with other work.
    spec = load_model_spec(tiny_repository / tiny.NAME)
    (worker,) = SessionPool.load(spec, Settings(**args)).workers
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert worker.options.get_session_config_entry(key) == spin


class Recording:
    """An onnxruntime session that counts its runs."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.runs = 0

    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.runs += 1
        return self.session.run(*args, **kwargs)


def test_busy_batches_run_on_a_non_spinning_copy(tiny_repository, tiny_images) -> None:
    spec = load_model_spec(tiny_repository / tiny.NAME)
    pool = SessionPool.load(spec, Settings(intra_op_threads=2))
    (worker,) = pool.workers
    assert worker.calm is not None and worker.calm_options is not None
    key = "session.intra_op.allow_spinning"
    assert worker.options.get_session_config_entry(key) == "1"
    assert worker.calm_options.get_session_config_entry(key) == "0"
    spinning, calm = Recording(worker.session), Recording(worker.calm)
    worker.session, worker.calm = spinning, calm  # type: ignore[assignment]
    images = np.ascontiguousarray(tiny_images[:4])
    alone, busy = worker.run(images), worker.run(images, busy=True)
    assert (spinning.runs, calm.runs) == (1, 1)
    for a, b in zip(alone, busy, strict=True):
        np.testing.assert_array_equal(a, b)
    pool.warmup([1, 2], spec.input_shape)  # both copies warmed, every size
    assert (spinning.runs, calm.runs) == (3, 3)
    worker.recreate()  # after a failure: both anew
    assert worker.session is not spinning and worker.calm is not calm and worker.calm is not None


@pytest.mark.parametrize(
    "args",
    [
        {"intra_op_threads": 1},  # no pool threads to spin
        {"intra_op_threads": 2, "cpu_spinning": False},
        {"intra_op_threads": 2, "spin_under_load": True},
    ],
)
def test_no_copy_where_nothing_spins_or_spinning_is_wanted(tiny_repository, args) -> None:
    spec = load_model_spec(tiny_repository / tiny.NAME)
    (worker,) = SessionPool.load(spec, Settings(**args)).workers
    assert worker.calm is None
    worker.run(np.zeros((1, *spec.input_shape), np.uint8), busy=True)


@pytest.mark.gpu
def test_cuda_matches_cpu(cifar_repository, cifar_test) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider here")
    spec = load_model_spec(cifar_repository / "resnet20_cifar10")
    images = np.ascontiguousarray(cifar_test["images"][:64])
    cpu = SessionPool.load(spec, Settings(device="cpu")).workers[0].run(images)
    gpu_worker = SessionPool.load(spec, Settings(device="cuda")).workers[0]
    assert gpu_worker.session.get_providers()[0] == "CUDAExecutionProvider"
    gpu = gpu_worker.run(images)
    for c, g in zip(cpu, gpu, strict=True):
        assert np.abs(c - g).max() / np.abs(c).max() < 1e-3
    assert (cpu[0].argmax(1) == gpu[0].argmax(1)).mean() == 1.0
