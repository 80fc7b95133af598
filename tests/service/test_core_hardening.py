"""Issue 13's items that live in the inference core, each over real HTTP on the tiny
model: decode work does not outlive its request or get blamed on another, large parsing
runs off the event loop within a memory bound, stalled uploads do not hold batches, and
bytes are budgeted before they are admitted."""

from __future__ import annotations

import socket
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


def _slow_decoding(engine: Any, slow: bytes) -> tuple[threading.Event, list[int]]:
    """Decoding ``slow`` waits for the returned event; the list gets each such image's
    index as its decode starts."""
    real = engine.preprocess_one
    release, started = threading.Event(), []
    lock = threading.Lock()

    def preprocess(data: bytes, index: int, **kw: Any) -> Any:
        if data == slow:
            with lock:
                started.append(index)
            release.wait(HOLD_TIMEOUT_S)
        return real(data, index, **kw)

    engine.preprocess_one = preprocess
    return release, started


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
        release, started = _slow_decoding(srv.runtime.engine, slow)
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


def _held_parse(engine: Any) -> tuple[threading.Event, list[int]]:
    """Every parse the engine takes off the loop waits for the returned event; the list
    counts those that started (inside the engine's bound)."""
    real = engine.parse
    gate, entered = threading.Event(), []

    async def parse(fn: Any) -> Any:
        def held() -> Any:
            entered.append(1)
            gate.wait(HOLD_TIMEOUT_S)
            return fn()

        return await real(held)

    engine.parse = parse
    return gate, entered


def _bodies(image: bytes) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """name -> (path, body, headers): a large body of each form that must not be parsed on
    the event loop (issue 13 items 4-6)."""
    import base64
    import gzip

    b64 = base64.b64encode(image).decode()
    padded = b'{"images": ["' + b64.encode() + b'"]' + b" " * 300_000 + b"}"
    boundary = "BOUNDARY"
    lines = b"\r\n--BOUNDARYz" * 30_000  # looks like boundaries, is not
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\n').encode()
        + lines
        + f"\r\n--{boundary}--\r\n".encode()
    )
    zeros = gzip.compress(b"0" * 8_000_000)  # ~8 KB inflating to 8 MB
    return {
        "v1-json": ("/v1/classify", padded, {"content-type": "application/json"}),
        "v1-multipart": ("/v1/classify", multipart,
                         {"content-type": f"multipart/form-data; boundary={boundary}"}),
        "v2-gzip": (f"/v2/models/{tiny.NAME}/infer", zeros,
                    {"content-type": "application/json", "content-encoding": "gzip"}),
    }  # fmt: skip


def test_large_bodies_are_parsed_off_the_loop_a_bounded_number_at_once(
    tiny_repository: Path, tiny_pngs: list[bytes]
) -> None:
    """Issue 13 items 5 and 6: a large JSON, multipart or compressed body is parsed on a
    thread, one at a time here (--decode-workers 1), while /healthz answers; a parse held
    on the loop would hold /healthz with it."""
    bodies = _bodies(tiny_pngs[0])
    with thread_server(tiny_repository, decode_workers=1) as srv:
        gate, entered = _held_parse(srv.runtime.engine)
        answers: dict[str, int] = {}

        def send(name: str) -> None:
            path, body, headers = bodies[name]
            answers[name] = httpx.post(srv.url + path, content=body, headers=headers,
                                       timeout=HOLD_TIMEOUT_S).status_code  # fmt: skip

        clients = [threading.Thread(target=send, args=(n,)) for n in bodies]
        try:
            for c in clients:
                c.start()
            wait_until(lambda: len(entered) == 1, timeout=60)
            assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200
            time.sleep(0.5)  # the other two would have started by now if unbounded
            assert len(entered) == 1
        finally:
            gate.set()
            for c in clients:
                c.join(60)
        assert len(entered) == 3
        # Each is answered as the client's input: the note field is not a parameter (422),
        # eight megabytes of digits are not an inference request (400).
        assert answers == {"v1-json": 200, "v1-multipart": 422, "v2-gzip": 400}, answers


def test_millions_of_tiny_json_images_are_refused_before_parsing(tiny_repository: Path) -> None:
    """Issue 13 item 4: the image count is known from the body's quotes, before anything
    is parsed or decoded."""
    body = b'{"images": [' + b",".join([b'"AA=="'] * 400_000) + b"]}"
    with thread_server(tiny_repository) as srv:
        _, entered = _held_parse(srv.runtime.engine)
        r = httpx.post(srv.url + "/v1/classify", content=body,
                       headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "payload_too_large"
        assert "more than 64 images" in r.json()["error"]["message"]
        assert entered == []  # refused before any parse


def _stalled_upload(port: int, declared: int, sent: bytes = b"\x89PNG") -> socket.socket:
    """A /v1/classify upload that declares ``declared`` bytes, sends a few, then stalls."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def test_stalled_uploads_do_not_hold_batches(tiny_repository: Path, tiny_pngs: list[bytes]) -> None:
    """Issue 13 item 11: with an hour's batch delay, a batch waits for every announced
    request; uploads that stopped sending must not stay announced, or a lone client would
    wait the hour."""
    with thread_server(tiny_repository, max_batch_delay_ms=3_600_000) as srv:
        batcher = srv.runtime.models[tiny.NAME].batcher
        assert batcher is not None
        stalled = [_stalled_upload(srv.port, 1000) for _ in range(5)]
        try:
            wait_until(lambda: srv.runtime.engine.budget.used == 5000, timeout=30)
            wait_until(lambda: batcher.announced == 0, timeout=30)
            r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[0], headers=PNG,
                           timeout=30)  # fmt: skip
            assert r.status_code == 200, r.text
        finally:
            for sock in stalled:
                sock.close()
        wait_until(lambda: srv.runtime.engine.budget.used == 0, timeout=30)


def test_bytes_are_budgeted_before_they_are_read(
    tiny_repository: Path, tiny_pngs: list[bytes]
) -> None:
    """Issue 13 item 10: past --max-buffered-bytes a request is a 503 with Retry-After as
    soon as its headers declare a length that does not fit, before its body is sent; the
    others are served, and the budget comes back when the held uploads go."""
    with thread_server(tiny_repository, max_buffered_bytes=100_000) as srv:
        held = _stalled_upload(srv.port, 60_000)
        try:
            wait_until(lambda: srv.runtime.engine.budget.used == 60_000, timeout=30)
            refused = _stalled_upload(srv.port, 60_000, sent=b"")
            answer = refused.recv(65536).decode("latin-1")
            refused.close()
            assert answer.startswith("HTTP/1.1 503"), answer
            assert "retry-after: 1" in answer.lower() and '"code":"overloaded"' in answer
            r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[0], headers=PNG,
                           timeout=30)  # fmt: skip
            assert r.status_code == 200, r.text
        finally:
            held.close()
        wait_until(lambda: srv.runtime.engine.budget.used == 0, timeout=30)
        assert httpx.get(srv.url + "/readyz", timeout=30).status_code == 200


def _recording_threads(engine: Any) -> tuple[list[str], Any]:
    """The engine's decoding, recording the name of each thread it runs on (installed, and
    returned to be installed again after ``_slow_decoding``)."""
    real = engine.preprocess_one
    threads: list[str] = []

    def recording(*args: Any, **kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    engine.preprocess_one = recording
    return threads, recording


def test_a_timed_out_request_keeps_its_running_decode_counted(
    tiny_repository: Path, tiny_pngs: list[bytes]
) -> None:
    """A request that times out while its image is being decoded answers 504 at once; the
    decode, which cannot be interrupted, stays admitted until it ends, then nothing is."""
    slow = tiny_pngs[0]
    with thread_server(tiny_repository, decode_workers=1) as srv:
        release, started = _slow_decoding(srv.runtime.engine, slow)
        batcher = srv.runtime.models[tiny.NAME].batcher
        assert batcher is not None
        # As if other requests were in flight: the decode pool's path, not a lone request's.
        batcher.alone = lambda: False  # type: ignore[method-assign]
        try:
            headers = {**PNG, "x-request-timeout-ms": "300"}
            r = httpx.post(srv.url + "/v1/classify", content=slow, headers=headers, timeout=60)
            assert r.status_code == 504, r.text
            assert started == [0] and batcher.pending == 1
        finally:
            release.set()
        wait_until(lambda: batcher.pending == 0, timeout=30)
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[1], headers=PNG, timeout=30)
        assert r.status_code == 200 and batcher.pending == 0


def test_a_lone_request_is_decoded_by_the_session_thread_within_its_limits(
    tiny_repository: Path, tiny_pngs: list[bytes]
) -> None:
    """Alone, a request's image is decoded on the session's thread (one hand-off instead of
    three); with another request in flight, in the decode pool. A lone decode still answers
    400 at its time limit, and 504 at the request's deadline, before it ends; the session
    then finishes it and serves the next request."""
    slow = tiny_pngs[0]
    with thread_server(tiny_repository, decode_workers=1, decode_timeout_ms=400) as srv:
        engine = srv.runtime.engine
        threads, recording = _recording_threads(engine)
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[1], headers=PNG, timeout=30)
        assert r.status_code == 200
        timing = dict(p.split(";dur=") for p in r.headers["server-timing"].split(", "))
        assert set(timing) == {"preprocess", "queue", "inference"}
        batcher = srv.runtime.models[tiny.NAME].batcher
        assert batcher is not None
        batcher.alone = lambda: False  # type: ignore[method-assign]
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[1], headers=PNG, timeout=30)
        assert r.status_code == 200
        del batcher.alone
        assert threads[0].startswith(f"ort-{tiny.NAME}-cpu-0"), threads
        assert not threads[1].startswith("ort-"), threads

        for timeout_ms, status in ((None, 400), (200, 504)):
            release, _ = _slow_decoding(engine, slow)
            headers = PNG if timeout_ms is None else {**PNG, "x-request-timeout-ms": "200"}
            try:
                t = time.perf_counter()
                r = httpx.post(srv.url + "/v1/classify", content=slow, headers=headers, timeout=60)
                assert r.status_code == status, r.text
                assert time.perf_counter() - t < HOLD_TIMEOUT_S / 2
                if status == 400:
                    assert "image 0: decoding took longer than 0.4s" in r.text
                assert batcher.pending == 0  # the session holds it, not admission
                # Meanwhile the next request is not alone (the session is busy): it is
                # decoded in the pool, and runs once the session has finished the slow one.
                seen, answers = len(threads), []
                nxt = threading.Thread(target=lambda out=answers: out.append(httpx.post(
                    srv.url + "/v1/classify", content=tiny_pngs[2], headers=PNG, timeout=60
                )))  # fmt: skip
                nxt.start()
                wait_until(lambda n=seen: len(threads) > n, timeout=30)
                assert not threads[-1].startswith("ort-"), threads
            finally:
                release.set()
            nxt.join(60)
            assert answers[0].status_code == 200
            engine.preprocess_one = recording  # type: ignore[method-assign]


def test_sessions_that_run_alone_decode_every_request_themselves(
    tiny_repository: Path, tiny_pngs: list[bytes]
) -> None:
    """One session of one intra-op thread and one decode thread in the process (--workers
    N on N cores): every image is decoded by the session's thread before its run, not only
    a lone request's, within the same limits (the failing image named); otherwise the
    decode pool decodes under load."""
    options = {"intra_op_threads": 1, "sessions_per_device": 1, "decode_workers": 1}
    with thread_server(tiny_repository, decode_timeout_ms=400, **options) as srv:
        engine = srv.runtime.engine
        batcher = srv.runtime.models[tiny.NAME].batcher
        assert batcher is not None and batcher.pool.decodes
        info = httpx.get(f"{srv.url}/v1/models/{tiny.NAME}").json()
        assert info["decoding"] == "session threads"
        threads, _ = _recording_threads(engine)
        batcher.alone = lambda: False  # type: ignore[method-assign]
        files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(tiny_pngs[:3])]
        r = httpx.post(srv.url + "/v1/classify", files=files, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        assert len(threads) == 3 and all(t.startswith(f"ort-{tiny.NAME}-cpu-0") for t in threads)
        # A broken image, third of three: a 400 naming it, nothing blamed on the others.
        files[2] = ("file", ("2.png", b"not an image", "image/png"))
        r = httpx.post(srv.url + "/v1/classify", files=files, timeout=30)
        assert r.status_code == 400 and "image 2" in r.text, r.text
        # A decode past its limit, second of two: named, answered before it ends.
        release, _ = _slow_decoding(engine, tiny_pngs[3])
        try:
            slow = [files[0], ("file", ("1.png", tiny_pngs[3], "image/png"))]
            t = time.perf_counter()
            r = httpx.post(srv.url + "/v1/classify", files=slow, timeout=60)
            assert r.status_code == 400 and "image 1: decoding took longer than 0.4s" in r.text
            assert time.perf_counter() - t < HOLD_TIMEOUT_S / 2
        finally:
            release.set()
        wait_until(lambda: batcher.pending == 0, timeout=30)
    # The default split (one session of all cores' intra-op threads): the pool decodes.
    with thread_server(tiny_repository, intra_op_threads=2, decode_workers=2) as srv:
        batcher = srv.runtime.models[tiny.NAME].batcher
        assert batcher is not None and not batcher.pool.decodes
        info = httpx.get(f"{srv.url}/v1/models/{tiny.NAME}").json()
        assert info["decoding"] == "decode pool"
    # One single-threaded session but two decode threads, or two such sessions (their
    # decoding would contend for the GIL): the pool keeps decoding.
    for more in ({"decode_workers": 2}, {"decode_workers": 1, "sessions_per_device": 2}):
        with thread_server(tiny_repository, intra_op_threads=1, **more) as srv:
            batcher = srv.runtime.models[tiny.NAME].batcher
            assert batcher is not None and not batcher.pool.decodes


def test_a_requests_deadline_stops_its_work_in_its_own_task_and_only_its_own_cancel() -> None:
    """The work runs in the request's task (``Engine._guard``): its deadline cancels it,
    answered as a timeout once the work has unwound, with the task no longer cancelled;
    a cancel from outside (the drain timeout) still propagates, even when the deadline
    fell at the same time."""
    import asyncio
    from types import SimpleNamespace

    import pytest

    from resnet_serve.service.engine import Engine
    from resnet_serve.service.errors import RequestTimeoutError

    model = SimpleNamespace(name="m")
    unwound: list[str] = []

    async def work(hold_s: float) -> dict[str, np.ndarray]:
        try:
            await asyncio.sleep(hold_s)
            return {"logits": np.zeros((1, 2))}
        finally:
            unwound.append("done")

    async def guarded(hold_s: float, deadline_s: float) -> dict[str, np.ndarray]:
        deadline = time.perf_counter() + deadline_s
        return await Engine._guard(SimpleNamespace(), work(hold_s), model, 1, deadline, None)  # type: ignore[arg-type]

    async def scenario() -> None:
        assert (await guarded(0.0, 5.0))["logits"].shape == (1, 2)
        with pytest.raises(RequestTimeoutError):
            await guarded(5.0, 0.05)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # nothing left for a later await
        await asyncio.sleep(0)
        assert unwound == ["done", "done"]

        # Cancelled from outside while it waits: a CancelledError, not a timeout.
        outside = asyncio.ensure_future(guarded(5.0, 5.0))
        await asyncio.sleep(0.02)
        outside.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outside

        # A deadline already passed (its cancel due in the next turn) and an outside
        # cancel in this one: whichever lands first, the outside one is not swallowed.
        both = asyncio.ensure_future(guarded(5.0, 0.0))
        await asyncio.sleep(0)  # started: waiting in its work, its timer armed
        both.cancel()
        with pytest.raises(asyncio.CancelledError):
            await both
        assert unwound == ["done"] * 4

    asyncio.run(scenario())
