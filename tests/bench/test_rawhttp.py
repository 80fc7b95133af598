"""The load generator's lean HTTP client against small real servers that answer the way
some servers do: chunked bodies, ``Connection: close``, silence, a cut connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from resnet_serve.bench import rawhttp
from resnet_serve.bench.load import Target, run_step

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's body (its headers parsed for Content-Length), None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _answer(status: int, body: bytes, *extra: str) -> bytes:
    headers = "".join(f"{h}\r\n" for h in extra)
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def _one_request(port: int) -> bytes:
    return rawhttp.prepare(f"http://127.0.0.1:{port}/", [b"x"], [])[2][0]


def test_prepare_builds_whole_requests() -> None:
    host, port, requests = rawhttp.prepare(
        "http://127.0.0.1:8123/v1/classify?top_k=3", [b"abc", b""], [("X-Key", "k")]
    )
    assert (host, port) == ("127.0.0.1", 8123)
    assert requests[0] == (
        b"POST /v1/classify?top_k=3 HTTP/1.1\r\nHost: 127.0.0.1:8123\r\nX-Key: k\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    assert requests[1].endswith(b"Content-Length: 0\r\n\r\n")
    assert rawhttp.prepare("http://example.test/", [b"x"], [])[:2] == ("example.test", 80)
    with pytest.raises(ValueError, match="plain http"):
        rawhttp.prepare("https://127.0.0.1:8443/v1/classify", [b"x"], [])


def test_keep_alive_chunked_answers_and_a_close() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (body := await _read_request(reader)) is not None:
            seen.append(body)
            if len(seen) == 1:  # chunked, in two writes
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
                await writer.drain()
                writer.write(b"2\r\nde\r\n0\r\n\r\n")
            elif len(seen) == 2:
                writer.write(_answer(503, b"busy"))
            else:
                writer.write(_answer(200, b"bye", "Connection: close"))
                await writer.drain()
                writer.close()
                return

    async def main() -> list[object]:
        async with serve(handler) as port:
            conn = await rawhttp.Connection.open("127.0.0.1", port)
            _, _, reqs = rawhttp.prepare(f"http://127.0.0.1:{port}/", [b"1", b"22", b"333"], [])
            out: list[object] = [await conn.exchange(r, 5) for r in reqs]
            out.append(conn.closed)  # the server said close: the client does too
            with pytest.raises(rawhttp.ClosedError):
                await conn.exchange(reqs[0], 5)
            return out

    assert asyncio.run(main()) == [(200, b"abcde"), (503, b"busy"), (200, b"bye"), True]
    assert seen == [b"1", b"22", b"333"]  # all three on one connection


def test_silence_times_out_and_closes_and_a_cut_answer_fails() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await reader.read()  # never answers; returns when the client closes

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with serve(silent) as port:
            conn = await rawhttp.Connection.open("127.0.0.1", port)
            with pytest.raises(TimeoutError):
                await conn.exchange(_one_request(port), 0.2)
            # Closed, so that a late answer is never read as the next request's.
            assert conn.closed
        async with serve(cut) as port:
            conn = await rawhttp.Connection.open("127.0.0.1", port)
            with pytest.raises(ConnectionError):
                await conn.exchange(_one_request(port), 5)

    asyncio.run(main())


def test_a_step_reconnects_after_close_and_counts_what_fails() -> None:
    """Every answer closes its connection: each request opens a new one and all count.
    Then a server that is gone: every attempt is an error named by its exception."""
    connections = 0

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(_answer(200, b'{"results": [1]}', "Connection: close"))
        await writer.drain()
        writer.close()

    async def main() -> tuple[object, object]:
        async with serve(closing) as port:
            target = Target("service", f"http://127.0.0.1:{port}/v1/classify", 1)
            ok = await run_step(
                target, [b"x"], 2, warmup_s=0, duration_s=None, requests=10, timeout_s=5
            )
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        gone = await run_step(
            Target("service", f"http://127.0.0.1:{dead}/v1/classify", 1),
            [b"x"], 1, warmup_s=0, duration_s=0.3, requests=None, timeout_s=5,
        )  # fmt: skip
        return ok, gone

    ok, gone = rawhttp.run(main())
    assert ok.ok == 10 and ok.errors == {}  # type: ignore[attr-defined]
    assert connections >= 10
    assert gone.ok == 0  # type: ignore[attr-defined]
    assert set(gone.errors) == {"ConnectionRefusedError"}  # type: ignore[attr-defined]


def test_unknown_client_is_refused() -> None:
    target = Target("service", "http://127.0.0.1:1/", 1)
    with pytest.raises(ValueError, match="client must be one of"):
        asyncio.run(
            run_step(target, [b"x"], 1, warmup_s=0, duration_s=1, requests=None, timeout_s=1,
                     client="curl")
        )  # fmt: skip
