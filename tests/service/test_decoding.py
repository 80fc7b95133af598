"""The decode pool's time limit: per image, from the moment its own decode starts."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
import pytest

from resnet_serve.service.batcher import Ticket
from resnet_serve.service.decoding import decode_all
from resnet_serve.service.errors import InvalidImageError


class CountingTicket:
    """What ``decode_all`` asks of a request's ticket: images still decoding after the
    request gave up are held, then let go."""

    def __init__(self) -> None:
        self.held = 0

    def hold(self, n: int) -> None:
        self.held += n

    def let_go(self) -> None:
        self.held -= 1


def test_an_image_waiting_for_a_decode_thread_is_not_timed_yet() -> None:
    # One thread, two images of 0.6 limits each: the second ends 1.2 limits after both
    # were submitted, and only 0.6 after its own start. Waiting for a busy pool is not the
    # image's fault (admission and the request's deadline deal with a busy pool).
    limit_s = 1.0
    order: list[int] = []

    def work(blob: bytes, index: int) -> np.ndarray:
        order.append(index)
        time.sleep(0.6 * limit_s)
        return np.full(2, index)

    with ThreadPoolExecutor(1) as pool:
        t = time.monotonic()
        out = asyncio.run(
            decode_all(pool, [b"a", b"b"], work, limit_s, cast(Ticket, CountingTicket()))
        )
        assert time.monotonic() - t >= 1.2 * limit_s
    assert order == [0, 1] and [a.tolist() for a in out] == [[0, 0], [1, 1]]


def test_an_image_over_its_limit_fails_and_its_running_decode_stays_held() -> None:
    release = threading.Event()
    started: list[int] = []
    ticket = CountingTicket()

    def work(blob: bytes, index: int) -> np.ndarray:
        started.append(index)
        release.wait(60)
        return np.zeros(2)

    async def run() -> None:
        with pytest.raises(InvalidImageError, match=r"image 0: decoding took longer than 0\.2s"):
            await decode_all(pool, [b"a", b"b"], work, 0.2, cast(Ticket, ticket))
        # Image 0 cannot be interrupted: held until it ends; image 1 never started.
        assert ticket.held == 1
        release.set()
        for _ in range(600):
            if ticket.held == 0:
                break
            await asyncio.sleep(0.01)

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(run())
    assert started == [0] and ticket.held == 0


def test_one_requests_many_images_leave_room_for_another_request() -> None:
    # Was: every image of a request went into the pool at once, first come first served,
    # so another request's one image waited for all of them (64 large 16-bit PNGs held
    # small requests past their deadlines). Now at most ``window`` each.
    order: list[bytes] = []
    gate = threading.Event()

    def work(blob: bytes, index: int) -> np.ndarray:
        gate.wait(60)
        order.append(blob)
        return np.zeros(2)

    async def run() -> None:
        big = asyncio.ensure_future(
            decode_all(pool, [b"big"] * 8, work, 60.0, cast(Ticket, CountingTicket()), window=2)
        )
        await asyncio.sleep(0.05)  # the big request's first images are in the pool
        small = asyncio.ensure_future(
            decode_all(pool, [b"small"], work, 60.0, cast(Ticket, CountingTicket()), window=2)
        )
        await asyncio.sleep(0.05)
        gate.set()
        assert len(await small) == 1 and len(await big) == 8

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(run())
    # Behind the two of the big request's images that were in the pool, not all eight.
    assert order.index(b"small") <= 2, order
