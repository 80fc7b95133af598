"""Issue 13's items that live in the inference core, each over real HTTP on the tiny
model: decode work does not outlive its request or get blamed on another, large parsing
runs off the event loop within a memory bound, stalled uploads do not hold batches, and
bytes are budgeted before they are admitted."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.service import tiny
from tests.service.servers import HOLD_TIMEOUT_S, png, thread_server, wait_until

PNG = {"content-type": "image/png"}


def healthz_ms(url: str) -> float:
    t = time.perf_counter()
    assert httpx.get(url + "/healthz", timeout=60).status_code == 200
    return (time.perf_counter() - t) * 1000


def test_a_failed_image_cancels_its_siblings_and_blames_no_other_request(
    tiny_repository: Path, tiny_images: np.ndarray
) -> None:
    """Issue 13 item 8: one bad image among slow siblings is a 400 at once; siblings not
    started never run, running ones stay admitted until they end, and the next client's
    image, waiting for a decode thread longer than the decode limit, is not a 400."""
    slow, innocent = png(tiny_images[0]), png(tiny_images[1])
    limit_ms = 500
    with thread_server(
        tiny_repository, decode_workers=2, decode_timeout_ms=limit_ms
    ) as srv:  # fmt: skip
        engine = srv.runtime.engine
        real = engine.preprocess_one
        release, started = threading.Event(), []
        lock = threading.Lock()

        def preprocess(data: bytes, index: int, **kw: Any) -> Any:
            if data == slow:
                with lock:
                    started.append(index)
                release.wait(HOLD_TIMEOUT_S)
            return real(data, index, **kw)

        engine.preprocess_one = preprocess  # type: ignore[method-assign]
        batcher = srv.runtime.models[tiny.NAME].batcher
        assert batcher is not None
        try:
            # Image 0 fails at once, image 1 holds the other thread; the failure's thread
            # may pick image 2 up before the failure is handled. Images 3-5 wait for a
            # thread: they are cancelled, never decoded.
            files = [("file", ("bad.png", b"not an image", "image/png"))]
            files += [("file", (f"{i}.png", slow, "image/png")) for i in range(1, 6)]
            r = httpx.post(srv.url + "/v1/classify", files=files, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["message"].startswith("image 0")
            running = batcher.pending  # the siblings still running stay counted
            assert running in (1, 2)
            wait_until(lambda: len(started) == running, timeout=30)
            # Another client meanwhile: its image waits for a thread (one is held) longer
            # than the decode limit; that wait is not the image's decode time.
            answers: list[httpx.Response] = []
            client = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(srv.url + "/v1/classify", content=innocent, headers=PNG,
                               timeout=60)
                )
            )  # fmt: skip
            client.start()
            time.sleep(2 * limit_ms / 1000)  # at least the limit, however fast the machine
            release.set()
            client.join(60)
            assert answers and answers[0].status_code == 200, answers[0].text
            wait_until(lambda: batcher.pending == 0, timeout=30)
            assert sorted(started) == list(range(1, 1 + running))  # the rest never ran
        finally:
            release.set()
