"""The load generator's lean HTTP/1.1 client: prepared request bytes written to a
keep-alive connection, each answer read by httptools' C parser (uvicorn's own).

On a 2-core machine the clients share the CPU with the server they measure: every
microsecond a client spends per request is taken from that server. aiohttp's client
cost 0.13-0.19 ms of CPU per request under the default asyncio loop, this one about
0.045 under uvloop (resnet-bench's client CPU column; docs/benchmarks.md, "The load
generator's own CPU"), so that the
figures say more about the server and less about the client. What it does not do: TLS,
redirects, cookies, proxies, HTTP/2 (``--client aiohttp`` for those).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httptools

T = TypeVar("T")


class ClosedError(ConnectionError):
    """The server closed the connection before its answer was complete."""


def prepare(
    url: str, bodies: Sequence[bytes], headers: Sequence[tuple[str, str]]
) -> tuple[str, int, list[bytes]]:
    """``(host, port, requests)``: one complete ``POST`` (request line, headers, body) per
    body, built once so that sending one is a single write."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the raw client speaks plain http:// only, not {url!r}")
    port = parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers]
    head = "\r\n".join(lines)
    requests = [f"{head}\r\nContent-Length: {len(b)}\r\n\r\n".encode("latin-1") + b for b in bodies]
    return parts.hostname, port, requests


class Connection(asyncio.Protocol):
    """One connection: one request at a time, its answer as ``(status, body)``."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        _, conn = await asyncio.get_running_loop().create_connection(cls, host, port)
        return conn

    async def exchange(self, request: bytes, timeout_s: float) -> tuple[int, bytes]:
        """Send ``request``; its answer. Past ``timeout_s`` the connection is closed (its
        late answer must not be read as the next request's) and TimeoutError raised."""
        if self.closed or self._transport is None:
            raise ClosedError("connection closed")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._body = []
        # A timer rather than asyncio.wait_for: no task per request.
        timer = loop.call_later(timeout_s, self._expire, waiter)
        self._transport.write(request)
        try:
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _expire(self, waiter: asyncio.Future[tuple[int, bytes]]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())
            self.close()

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ClosedError("the server closed the connection"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self._parser.should_keep_alive()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), b"".join(self._body)))
        if not keep_alive:
            self.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where it is installed (it comes with uvicorn[standard]):
    the clients' event loop costs less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
