"""Decoding one request's images in the decode pool; or on the session's thread right
before its run (``Clocked``, ``watch``: the same time limit): a lone request's one image,
and every image where the sessions decode (``SessionPool.decodes``).

Each image's time limit (``--decode-timeout-ms``) counts from the moment its own decode
starts, never the time it waited for a decode thread: a busy pool is overload, answered by
admission (503) or the request's deadline (504), not blamed on the image (400). When one
image fails (or the request ends), its siblings that have not started are cancelled; those
already running cannot be interrupted (Pillow), so they stay counted in admission
(``Ticket.hold``) until they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from resnet_serve.service.batcher import Ticket
from resnet_serve.service.errors import InvalidImageError

Work = Callable[[bytes, int], np.ndarray]


class Clocked:
    """A lone request's decode, deferred to the session's thread (``batchrecord.Deferred``),
    that records when it starts and ends, for ``watch``."""

    __slots__ = ("ended", "fn", "started")

    def __init__(self, fn: Callable[[], np.ndarray]) -> None:
        self.fn = fn
        self.started: float | None = None
        self.ended = False

    def __call__(self) -> np.ndarray:
        self.started = time.monotonic()
        try:
            return self.fn()
        finally:
            self.ended = True


def watch(
    future: asyncio.Future[Any], decode: Clocked, limit_s: float, index: int = 0
) -> Callable[[], None]:
    """Fail ``future`` with a 400 for image ``index`` once ``decode`` has run ``limit_s``
    (from its own start, as in ``decode_all``); the session's thread finishes it unheeded.
    Returns the cancel."""
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []

    def check() -> None:
        if future.done() or decode.ended:
            return
        begun = decode.started
        left = limit_s if begun is None else begun + limit_s - time.monotonic()
        if left > 0:
            timer[:] = [loop.call_later(left, check)]
        else:
            future.set_exception(
                InvalidImageError(index, f"decoding took longer than {limit_s:g}s")
            )

    timer.append(loop.call_later(limit_s, check))
    return lambda: timer[0].cancel()


async def decode_all(
    pool: ThreadPoolExecutor,
    blobs: list[bytes],
    work: Work,
    limit_s: float,
    ticket: Ticket,
    window: int = 1 << 30,
) -> list[np.ndarray]:
    """``work(blob, index)`` for every blob, in order; the first failure is raised. At most
    ``window`` of them in the pool at once, the next submitted as one ends: the pool is
    first come, first served, and one request's many large images would otherwise hold
    every other request's decoding behind them for as long as they all take."""
    loop = asyncio.get_running_loop()
    results: list[asyncio.Future[np.ndarray]] = [loop.create_future() for _ in blobs]
    timers: dict[int, asyncio.TimerHandle] = {}
    held: set[int] = set()
    # When each decode started (time.monotonic()), written by its decode thread: the limit
    # is checked against it by a timer of the loop's, so a decode's start costs no hop to
    # the event loop (a wakeup per image).
    started: list[float | None] = [None] * len(blobs)

    def check(i: int) -> None:
        if results[i].done():
            return
        begun = started[i]
        left = limit_s if begun is None else begun + limit_s - time.monotonic()
        if left > 0:
            timers[i] = loop.call_later(left, check, i)
        else:
            results[i].set_exception(
                InvalidImageError(i, f"decoding took longer than {limit_s:g}s")
            )

    def settle(i: int, value: np.ndarray | None, error: BaseException | None) -> None:
        if error is None:
            submit_next()
        timer = timers.pop(i, None)
        if timer is not None:
            timer.cancel()
        if i in held:
            held.discard(i)
            ticket.let_go()
        if results[i].done():
            return
        if error is not None:
            results[i].set_exception(error)
        else:
            results[i].set_result(value)  # type: ignore[arg-type]

    def run(i: int, blob: bytes) -> None:
        # On a decode thread.
        started[i] = time.monotonic()
        value: np.ndarray | None = None
        error: BaseException | None = None
        try:
            value = work(blob, i)
        except BaseException as exc:  # handed to the request, not lost in this thread
            error = exc
        # The loop may be closed by now (the server stopped): nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, i, value, error)

    jobs: list[Future[None]] = []

    def submit_next() -> None:
        i = len(jobs)
        if i < len(blobs) and not stopped:
            jobs.append(pool.submit(run, i, blobs[i]))
            timers[i] = loop.call_later(limit_s, check, i)

    stopped = False
    for _ in range(min(window, len(blobs))):
        submit_next()
    try:
        if len(results) == 1:
            return [await results[0]]
        return list(await asyncio.gather(*results))
    except BaseException:
        stopped = True  # what was not submitted never will be
        for i, job in enumerate(jobs):
            # Not started: never will. Still running (even past its limit): counted in
            # admission until it ends (``settle``).
            if not job.cancel() and not job.done():
                held.add(i)
                ticket.hold(1)
        for r in results:
            if not r.done():
                r.cancel()
        for timer in timers.values():
            timer.cancel()
        raise
