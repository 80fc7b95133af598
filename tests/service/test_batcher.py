"""The batcher alone, with a fake session pool: closing rules, padding, order,
cancellation and admission.

No verdict here depends on this machine's speed: where a batch must not wait for its
delay, the delay is an hour and the test allows a minute; where it must wait, the bound is
far above the delay; a test waits for the fake session to be entered, never sleeps."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from resnet_serve.service.batcher import Batcher
from resnet_serve.service.devices import Device
from resnet_serve.service.errors import InferenceFailedError, NotReadyError, OverloadedError
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.sessions import SessionPool

SHAPE = (2, 2, 3)


class FakeWorker:
    """Echoes each image's first pixel as its 'logits'; records batch shapes."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max_workers=1)
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[int] = []
        self.names: list[tuple[str, ...]] = []
        self.busy: list[bool] = []
        self.recreated = 0
        self.gate = threading.Event()  # runs wait for it
        self.gate.set()
        self.entered = threading.Event()  # a run started

    name = "fake"
    device = Device("cpu")

    def run(
        self, images: np.ndarray, names: tuple[str, ...], busy: bool = False
    ) -> list[np.ndarray]:
        self.entered.set()
        self.gate.wait(60)
        self.batches.append(images.shape[0])
        self.names.append(names)
        self.busy.append(busy)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("device on fire")
        first = images[:, 0, 0, 0].astype(np.float32)
        outputs = {"logits": first[:, None], "embedding": np.repeat(first[:, None], 4, axis=1),
                   "layer1": np.repeat(first[:, None], 6, axis=1)}  # fmt: skip
        return [outputs[n] for n in names]

    def recreate(self) -> None:
        self.recreated += 1


def make(worker: FakeWorker, **kw) -> tuple[Batcher, Metrics]:  # type: ignore[no-untyped-def]
    metrics = Metrics()
    opts = {"buckets": [1, 2, 4, 8], "max_batch_delay_ms": 50.0, "max_queue_images": 64} | kw
    pool = SessionPool([worker], opts["buckets"])
    return Batcher("m", pool, image_shape=SHAPE, metrics=metrics, **opts), metrics


HOUR_MS = 3_600_000.0
MINUTE_S = 60.0


def img(v: int) -> np.ndarray:
    return np.full(SHAPE, v, dtype=np.uint8)


async def submit(b: Batcher, values: list[int]) -> list[float]:
    with b.admission() as ticket:
        ticket.admit(len(values))
        futures = ticket.submit([img(v) for v in values])
    return [float(r["logits"][0]) for r in await asyncio.gather(*futures)]


def test_results_in_order_and_padding_to_buckets() -> None:
    async def main() -> None:
        worker = FakeWorker()
        b, metrics = make(worker)
        b.start()
        assert await submit(b, [3, 1, 4]) == [3.0, 1.0, 4.0]
        await b.close(1)
        assert worker.batches == [4]  # 3 images padded to the bucket of 4
        reg = metrics.registry
        assert reg.get_sample_value("resnet_serve_batch_size_sum", {"model": "m"}) == 3
        assert reg.get_sample_value("resnet_serve_batch_padding_images_total", {"model": "m"}) == 1

    asyncio.run(main())


def test_batch_closes_at_max_size() -> None:
    async def main() -> None:
        worker = FakeWorker()
        b, _ = make(worker, max_batch_delay_ms=HOUR_MS)
        b.start()
        e = b.admission()  # another request is on its way: the batcher would wait for it
        # Closed by size, not by the hour's delay.
        results = await asyncio.wait_for(submit(b, list(range(8))), MINUTE_S)
        assert results == [float(v) for v in range(8)]
        e.close()
        await b.close(1)
        assert worker.batches == [8]

    asyncio.run(main())


def test_batch_waits_for_announced_requests() -> None:
    async def main() -> None:
        worker = FakeWorker()
        b, _ = make(worker, max_batch_delay_ms=HOUR_MS)
        b.start()
        e = b.admission()
        first = asyncio.ensure_future(submit(b, [1]))
        # The batcher's loop runs with the first image queued: a batcher that did not wait
        # for the announced request would take it alone now.
        for _ in range(10):
            await asyncio.sleep(0)
        assert b.queued == 1
        # The announced request's image comes: the batch closes with both at once.
        e.admit(1)
        futures = e.submit([img(2)])
        e.close()
        second = [
            float(r["logits"][0])
            for r in await asyncio.wait_for(asyncio.gather(*futures), MINUTE_S)
        ]
        assert await first == [1.0] and second == [2.0]
        assert worker.batches == [2]  # one batch for both
        await b.close(1)

    asyncio.run(main())


def test_batch_waits_for_announced_requests_only_up_to_the_delay() -> None:
    async def main() -> None:
        worker = FakeWorker()
        b, _ = make(worker, max_batch_delay_ms=200)
        b.start()
        # Announced but never arriving: the batch still closes, after the delay.
        e = b.admission()
        t = time.perf_counter()
        assert await asyncio.wait_for(submit(b, [5]), MINUTE_S) == [5.0]
        assert time.perf_counter() - t > 0.15  # it did wait (timers never fire early)
        e.close()
        await b.close(1)
        assert worker.batches == [1]

    asyncio.run(main())


def test_lone_request_does_not_wait_for_the_delay() -> None:
    async def main() -> None:
        b, _ = make(FakeWorker(), max_batch_delay_ms=HOUR_MS)
        b.start()
        assert await asyncio.wait_for(submit(b, [7]), MINUTE_S) == [7.0]
        await b.close(1)

    asyncio.run(main())


def test_batches_run_busy_while_other_requests_are_in_flight() -> None:
    async def main() -> None:
        worker = FakeWorker()
        b, _ = make(worker)
        b.start()

        async def request(values: list[int]) -> None:
            # Open until answered, as the engine holds its ticket.
            with b.admission() as t:
                t.admit(len(values))
                await asyncio.gather(*t.submit([img(v) for v in values]))

        await request([1, 2, 3])  # alone, even with three images: spinning is worth it
        other = b.admission()  # another request, still reading its body
        other.pause()  # (not awaited by batches: its body stalled)
        await request([4])
        other.close()
        other.close()  # idempotent: counted once
        await request([5])
        gone = b.admission()  # a request that left while its image decodes on
        gone.admit(1)
        gone.hold(1)
        gone.close()
        await request([6])
        gone.let_go()
        await request([7])
        await b.close(1)
        assert worker.busy == [False, True, False, True, False]

    asyncio.run(main())


def test_batches_run_busy_while_another_batch_runs() -> None:
    # Was: ``busy`` counted requests and queued images, not running batches, so a request
    # over the largest batch and one whose client left while its batch ran sent batches to
    # the shared every-core session at once (``sessions.Lone``).
    async def main() -> None:
        workers = [FakeWorker(), FakeWorker()]
        metrics = Metrics()
        pool = SessionPool(workers, [1, 2])  # type: ignore[list-item]
        b = Batcher("m", pool, image_shape=SHAPE, metrics=metrics, buckets=[1, 2],
                    max_batch_delay_ms=1.0, max_queue_images=64)  # fmt: skip
        b.start()
        assert await submit(b, [1, 2, 3]) == [1.0, 2.0, 3.0]  # one request, two batches
        assert sorted(workers[0].busy + workers[1].busy) == [True, True]
        for w in workers:
            w.busy.clear()
            w.entered.clear()
            w.gate.clear()
        first = asyncio.ensure_future(submit(b, [4]))
        while not any(w.entered.is_set() for w in workers):
            await asyncio.sleep(0.01)
        stuck, free = workers if workers[0].entered.is_set() else workers[::-1]
        first.cancel()  # its client left; its batch still runs
        with pytest.raises(asyncio.CancelledError):
            await first
        free.gate.set()
        assert await asyncio.wait_for(submit(b, [5]), MINUTE_S) == [5.0]
        assert free.busy == [True]
        stuck.gate.set()
        await b.close(1)
        assert stuck.busy == [False]  # it was alone when it started

    asyncio.run(main())


def test_cancelled_work_is_not_computed() -> None:
    async def main() -> None:
        worker = FakeWorker()
        b, metrics = make(worker)
        b.start()
        worker.gate.clear()  # the session is busy
        busy = asyncio.ensure_future(submit(b, [1]))
        assert await asyncio.to_thread(worker.entered.wait, MINUTE_S)  # with the first image
        with b.admission() as t:
            t.admit(2)
            gone = t.submit([img(9), img(9)])
        for f in gone:
            f.cancel()  # the client left while queued
        worker.gate.set()
        assert await busy == [1.0]
        assert await submit(b, [2]) == [2.0]
        await b.close(1)
        assert worker.batches == [1, 1]  # the cancelled images never ran
        assert (
            metrics.registry.get_sample_value(
                "resnet_serve_rejected_images_total", {"model": "m", "reason": "cancelled"}
            )
            == 2
        )

    asyncio.run(main())


def test_admission_is_bounded() -> None:
    async def main() -> None:
        b, _ = make(FakeWorker(), max_queue_images=4)
        first = b.admission()
        first.admit(3)
        with pytest.raises(OverloadedError) as exc, b.admission() as second:
            second.admit(2)
        assert exc.value.headers["Retry-After"] == "1"
        assert b.pending == 3
        first.close()  # what was admitted and never queued comes back
        assert b.pending == 0
        with b.admission() as third:
            third.admit(4)
            third.hold(1)  # one image's decoding cannot be stopped: still counted
        assert b.pending == 1
        third.let_go()
        assert b.pending == 0

    asyncio.run(main())


def test_inference_failure_fails_only_that_batch() -> None:
    async def main() -> None:
        worker = FakeWorker(fail=True)
        b, metrics = make(worker)
        b.start()
        with pytest.raises(InferenceFailedError):
            await submit(b, [1, 2])
        worker.fail = False
        assert await submit(b, [3]) == [3.0]
        assert worker.recreated == 1
        await b.close(1)
        assert (
            metrics.registry.get_sample_value(
                "resnet_serve_inference_failures_total", {"model": "m"}
            )
            == 1
        )

    asyncio.run(main())


def test_queued_work_fails_at_once_when_no_session_is_left() -> None:
    # Was: the queue's images waited for their request's timeout (and the drain for its
    # own, twice) once the last session was retired: nothing would ever run them.
    class Unrecoverable(FakeWorker):
        def recreate(self) -> None:
            raise RuntimeError("the inference process is gone")

    async def main() -> None:
        worker = Unrecoverable(fail=True)
        worker.gate.clear()
        b, _ = make(worker, max_batch_delay_ms=0.0)
        broken: list[bool] = []
        b.pool.on_broken = lambda: broken.append(True)  # the runtime: not ready any more
        b.start()
        running = asyncio.ensure_future(submit(b, [1]))
        while not worker.entered.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(submit(b, [2]))  # waits for the busy session
        await asyncio.sleep(0.05)
        assert b.queued == 1
        worker.gate.set()  # the run fails, the session cannot be made again
        with pytest.raises(InferenceFailedError):
            await asyncio.wait_for(running, MINUTE_S)
        with pytest.raises(NotReadyError):
            await asyncio.wait_for(queued, MINUTE_S)
        assert b.pool.broken and b.queued == 0 and broken == [True]
        t = time.perf_counter()
        await b.close(MINUTE_S)  # nothing left to wait for
        assert time.perf_counter() - t < MINUTE_S / 2

    asyncio.run(main())


def test_close_finishes_accepted_work() -> None:
    async def main() -> None:
        worker = FakeWorker(delay_s=0.05)
        b, _ = make(worker)
        b.start()
        pending = [asyncio.ensure_future(submit(b, [i])) for i in range(10)]
        await asyncio.sleep(0)
        await b.close(MINUTE_S)  # ~0.5 s of work: the drain's limit is not what ends it
        assert [await p for p in pending] == [[float(i)] for i in range(10)]

    asyncio.run(main())


def test_a_batch_fetches_the_union_of_requested_outputs() -> None:
    async def main() -> None:
        worker = FakeWorker()
        b, _ = make(worker, max_batch_delay_ms=200)
        b.start()
        e = b.admission()
        e.admit(1)
        (plain,) = e.submit([img(1)], ("logits",))
        with b.admission() as t:
            t.admit(1)
            (feats,) = t.submit([img(2)], ("layer1", "embedding"))
        r1, r2 = await plain, await feats
        await b.close(1)
        assert worker.names == [("logits", "layer1", "embedding")]  # one batch, each name once
        assert set(r1) == {"logits"} and set(r2) == {"layer1", "embedding"}
        assert r2["layer1"].shape == (6,) and float(r2["layer1"][0]) == 2.0

    asyncio.run(main())
