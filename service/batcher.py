"""Dynamic batching, one batcher per model.

One asyncio task owns the queue. Each image of a request is an item with its own
future. The task waits for an idle session, then closes a batch at ``max_batch_size``
images or ``max_batch_delay_ms`` after its first image, whichever comes first; while
all sessions are busy the queue grows, so batches grow with load. Items whose request
is gone (future cancelled: client disconnected or timed out) are dropped unrun.
Admission is explicit: past ``max_queue_images`` a request is refused at once (503), and
one that could never fit, having more images than that on its own, is too large (413).
Waiting for more images only pays when more are coming: a request announces itself
(``admission``) as soon as it arrives, before its body is read and decoded, and a batch
waits for its delay only while announced requests have not submitted yet.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque

import numpy as np

from resnet_serve.service import batchrecord
from resnet_serve.service.batchrecord import BatchRecord, Deferred, QueuedImage, Result
from resnet_serve.service.errors import (
    InferenceFailedError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
)
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.sessions import DEFAULT_OUTPUTS, Runner, SessionPool
from resnet_serve.service.timing import current

log = logging.getLogger(__name__)


class Ticket:
    """One request's admission, from its arrival to its images being queued.

    Created by ``Batcher.admission()``: the request is announced at once (batches forming
    now wait for it while it reads and decodes its body). ``admit(n)`` admits its images
    or refuses them (503, 413); ``submit`` queues them. ``close()`` (the ``with`` block's
    end) ends the announcement and gives back whatever was admitted and never queued,
    except images ``hold``-ed (still being decoded), which count until ``let_go``.
    Every step is idempotent or counted, so no path through a request can leak."""

    __slots__ = ("_admitted", "_announced", "_batcher", "_held", "_open", "_over")

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self._announced, self._over, self._open = True, False, True
        self._admitted = self._held = 0
        batcher._expected += 1
        batcher._requests += 1

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pause(self) -> None:
        """Batches stop waiting for this request (its body stalled)..."""
        if self._announced:
            self._announced = False
            self._batcher._arrived()

    def resume(self) -> None:
        """... and wait for it again (bytes arrive again), unless its images came."""
        if not self._announced and not self._over:
            self._announced = True
            self._batcher._expected += 1

    def admit(self, n: int) -> None:
        self._batcher._reserve(n)
        self._admitted += n

    def submit(
        self, images: list[np.ndarray | Deferred], outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    ) -> list[asyncio.Future[Result]]:
        """Queue admitted images; one future each, in order, for the named outputs."""
        if len(images) > self._admitted - self._held:
            raise RuntimeError(f"{len(images)} images submitted, {self._admitted} admitted")
        self._admitted -= len(images)
        self._batcher._incoming -= len(images)
        futures = self._batcher._enqueue(images, outputs)
        self._over = True
        self.pause()
        return futures

    def hold(self, n: int) -> None:
        """``n`` admitted images whose decoding cannot be stopped: they stay counted
        after ``close`` until ``let_go`` (called once each ends)."""
        self._held += n

    def let_go(self, n: int = 1) -> None:
        n = min(n, self._held)
        self._held -= n
        self._admitted -= n
        self._batcher._incoming -= n

    def close(self) -> None:
        if self._open:
            self._open = False
            self._batcher._requests -= 1
        self._over = True
        self.pause()
        free = self._admitted - self._held
        self._admitted -= free
        self._batcher._incoming -= free


class Batcher:
    def __init__(
        self,
        model: str,
        pool: SessionPool,
        *,
        image_shape: tuple[int, int, int],
        buckets: list[int],
        max_batch_delay_ms: float,
        max_queue_images: int,
        metrics: Metrics,
    ) -> None:
        self.model = model
        self.pool = pool
        self.image_shape = image_shape
        self.buckets = sorted(buckets)
        self.max_batch_size = self.buckets[-1]
        self.delay_s = max_batch_delay_ms / 1000.0
        self.max_queue_images = max_queue_images
        self.metrics = metrics
        self._queue: deque[QueuedImage] = deque()
        self._incoming = 0
        self._expected = 0
        self._requests = 0  # tickets open: requests from arrival to answer
        self._free = False
        self._waiter: asyncio.Future[None] | None = None  # the batch loop's (``_wait``)
        self._filling = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._record = BatchRecord(model, metrics)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Images admitted: queued, or reserved and still being decoded."""
        return len(self._queue) + self._incoming

    @property
    def announced(self) -> int:
        """Requests admitted to the batcher whose images are not queued yet."""
        return self._expected

    def start(self) -> None:
        self.pool.start()
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.model}")

    def admission(self) -> Ticket:
        """Announce a request whose images are on their way; see ``Ticket``."""
        return Ticket(self)

    def _arrived(self) -> None:
        self._expected -= 1
        self._wake()  # a waiting batch may be waiting for this request

    def _reserve(self, n: int) -> None:
        """Admit ``n`` images that are about to be decoded, or refuse them now: 503 while
        the queue is too full for them, 413 if they exceed the limit on their own."""
        if self._closing:
            raise NotReadyError("the service is shutting down")
        if n > self.max_queue_images:
            # Not a 503: retrying could never help, the request is too large on its own.
            raise PayloadTooLargeError(
                f"{n} images in one request can never be admitted: model {self.model} "
                f"admits at most {self.max_queue_images} images at once (--max-queue-images)"
            )
        if self.pending + n > self.max_queue_images:
            self.metrics.rejected.labels(self.model, "queue_full").inc(n)
            raise OverloadedError(
                f"model {self.model} is overloaded ({self.pending} images pending, "
                f"limit {self.max_queue_images}); retry later"
            )
        self._incoming += n
        if (timing := current()) is not None:
            timing.reserved()

    def _enqueue(
        self, images: list[np.ndarray | Deferred], outputs: tuple[str, ...]
    ) -> list[asyncio.Future[Result]]:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if (timing := current()) is not None:
            timing.submitted()
        futures: list[asyncio.Future[Result]] = []
        for image in images:
            fut: asyncio.Future[Result] = loop.create_future()
            self._queue.append(QueuedImage(image, fut, now, outputs, timing))
            futures.append(fut)
        self._wake()
        return futures

    async def _loop(self) -> None:
        while True:
            worker = await self.pool.acquire()
            self._free = True  # a session waits for work (``alone``)
            items = await self._collect()
            self._free = False
            if not items:
                self.pool.release(worker)
                if items is None:
                    return
                continue
            task = asyncio.create_task(self._execute(worker, items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _wake(self, timed_out: bool = False) -> None:
        """The batch loop's wait may be over. A filling batch wakes once full, timed out or
        with nobody announced left: not at every image (each was a task and a loop turn)."""
        w = self._waiter
        if w is None or w.done():
            return
        filling = self._filling and not self._closing and self._expected > 0
        if timed_out or not (filling and 0 < len(self._queue) < self.max_batch_size):
            w.set_result(None)

    async def _wait(self, timeout: float | None, filling: bool) -> None:
        loop = asyncio.get_running_loop()
        self._waiter, self._filling = loop.create_future(), filling
        timer = loop.call_later(timeout, self._wake, True) if timeout is not None else None
        try:
            await self._waiter  # left there, done: ``_wake`` ignores it
        finally:
            if timer is not None:
                timer.cancel()

    async def _collect(self) -> list[QueuedImage] | None:
        """The next batch; ``None`` once closing with nothing left."""
        while not self._queue:
            if self._closing:
                return None
            await self._wait(None, filling=False)
        # The batch's clock starts at its first image's arrival, not at this call: an image
        # that already waited for a busy session is not made to wait again.
        deadline = self._queue[0].enqueued + self.delay_s
        while len(self._queue) < self.max_batch_size and self._expected > 0 and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            await self._wait(remaining, filling=True)
        items: list[QueuedImage] = []
        while self._queue and len(items) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # cancelled: the client left or timed out
                self.metrics.rejected.labels(self.model, "cancelled").inc()
                continue
            items.append(item)
        return items

    async def _execute(self, worker: Runner, items: list[QueuedImage]) -> None:
        try:
            start = time.perf_counter()
            self._record.started(items, start)
            n = len(items)
            # Other requests or batches in flight (a request's first batch, one whose client
            # left): spinning threads would take their CPU. A lone client's batch spins.
            busy = self._requests > 1 or self.pending > 0 or len(self._running) > 1
            bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
            shape = (bucket, *self.image_shape)
            loop = asyncio.get_running_loop()
            try:
                failed, assembled, outputs = await loop.run_in_executor(
                    worker.executor, batchrecord.run_batch, worker, items, shape, busy
                )
            except Exception as exc:
                log.exception("inference failed on a batch of %d for %s", n, self.model)
                error = InferenceFailedError(f"inference failed for model {self.model}: {exc}")
                self._record.failed(items, error)
                if not await self.pool.recover(worker) and self.pool.broken:  # nothing will run
                    batchrecord.abandon(self._queue, NotReadyError(f"model {self.model} is broken"))
                return
            ran = time.perf_counter()
            ok = batchrecord.hand_out(items, failed, outputs)
            if ok:  # not every image failed to decode
                self._record.ran(ok, bucket, start, assembled, ran, time.perf_counter())
        finally:
            self.pool.release(worker)

    def alone(self) -> bool:
        """One request in flight, a session free: its image may be ``Deferred``."""
        return self._requests == 1 and self._free and not self._queue

    async def close(self, timeout_s: float) -> None:
        """Stop taking work, finish what was accepted (up to ``timeout_s``), stop."""
        self._closing = True
        self._wake()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._task is not None:
            # With nothing queued the loop may be parked waiting for a session (all busy or
            # retired): there is nothing left for it to do, so it is stopped, not awaited.
            if any(not item.future.done() for item in self._queue):
                done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
                if not done:
                    log.warning("%s: drain timed out with %d queued", self.model, self.queued)
            self._task.cancel()
        if self._running:
            await asyncio.wait(set(self._running), timeout=max(deadline - loop.time(), 0.1))
        batchrecord.abandon(self._queue, NotReadyError("the service shut down"))
        self.pool.close()
