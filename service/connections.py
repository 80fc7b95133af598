"""Limits on what one TCP connection may hold before the application sees a request.

uvicorn's HTTP protocol bounds none of these: a header of any size (httptools joins the
pieces of a header value as they arrive, so a large one costs time quadratic in its size,
all on the event loop), any number of header fields, a connection that never sends a byte
or sends its headers one byte a minute, a body that stops arriving halfway, and any number
of open connections until the process runs out of file descriptors. Each is refused here,
per connection, with a JSON answer where a request was started:

- header bytes over ``max_header_bytes`` or more than ``max_headers`` fields: 431;
- headers not complete ``header_timeout_s`` after the connection opened (or after the
  first byte of the next request on a kept-alive one): 408, or closed quietly if not one
  byte of the request arrived;
- no body byte for ``body_idle_timeout_s`` while the application waits for more: 408;
- more than ``max_connections`` open at once: 503 with Retry-After, at once.

A refused connection is closed after a short linger that reads and discards what the
client still sends: closing with unread bytes would make the kernel send a reset, and the
client could lose the answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from resnet_serve.service.metrics import Metrics
from resnet_serve.service.transport import CoalescingTransport

log = logging.getLogger(__name__)
LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024  # discarded at most while lingering, then closed at once
# Refusals are logged at most this often (with a count): an attack is not a log flood.
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_idle_timeout_s: float
    max_connections: int


class _Refusal(Exception):
    """Raised from a parser callback to stop parsing; the answer is sent after."""


class _RefusalLog:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last = 0.0

    def note(self, reason: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            log.warning(
                "connection refused: %s (refused since the last such line: %s)",
                detail, ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())),
            )  # fmt: skip
            self.counts = {}


# The ASGI scope's extension holding a future that completes when the client of that
# request disconnects (``disconnected``): ``Engine.infer`` watches it with a callback.
DISCONNECTED = "resnet_serve.disconnected"


def disconnected(scope: dict[str, Any]) -> asyncio.Future[None] | None:
    """The request's disconnect future, where the connection is one of ours."""
    return scope.get("extensions", {}).get(DISCONNECTED)


def guarded_protocol(limits: ConnectionLimits, metrics: Metrics) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with ``limits``: pass as ``uvicorn.Config(http=...)``."""
    refusals = _RefusalLog()
    metrics.max_connections.set(limits.max_connections)

    class GuardedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._reading_headers = True
            self._header_bytes = 0
            self._request_bytes = 0  # of the request whose headers are being read
            self._refusal: tuple[int, str, str, str] | None = None
            self._refused = False
            self._discarded = 0
            self._last_data = 0.0
            self._timer: asyncio.TimerHandle | None = None

        # Connection events ---------------------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            # Answers on a connection follow one another: the first write of each (its
            # head) is held for its body.
            self._out = CoalescingTransport(transport, self.loop)
            self._out.hold_next()
            super().connection_made(self._out)  # type: ignore[arg-type]
            metrics.connections.inc()
            if len(self.connections) > limits.max_connections:
                self._refuse(
                    503, "overloaded", f"more than {limits.max_connections} connections open",
                    "too_many_connections",
                )  # fmt: skip
                return
            self._arm(limits.header_timeout_s, self._header_deadline)

        def connection_lost(self, exc: Exception | None) -> None:
            metrics.connections.dec()
            self._disarm()
            super().connection_lost(exc)
            self._gone()

        def _gone(self) -> None:
            """The current request's client is gone (``DISCONNECTED``)."""
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                future = disconnected(cycle.scope)
                if future is not None and not future.done():
                    future.set_result(None)

        def data_received(self, data: bytes) -> None:
            if self._refused:  # lingering: read and discard, a bounded amount
                self._discarded += len(data)
                if self._discarded > LINGER_BYTES:
                    self.transport.close()
                return
            self._last_data = self.loop.time()
            if self._reading_headers:
                self._header_bytes += len(data)
                self._request_bytes += len(data)
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError:
                if self._refusal is None:
                    msg = "Invalid HTTP request received."
                    self.logger.warning(msg)
                    self.send_400_response(msg)
                    return
            if self._refusal is None and (
                self._reading_headers and self._header_bytes > limits.max_header_bytes
            ):
                self._refusal = (
                    431, "header_too_large",
                    f"request headers exceed {limits.max_header_bytes} bytes",
                    "header_too_large",
                )  # fmt: skip
            if self._refusal is not None:
                self._refuse(*self._refusal)

        # Parser callbacks ----------------------------------------------------------

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._reading_headers = True
            if self._timer is None:  # a kept-alive connection's next request
                self._timer = self.loop.call_later(limits.header_timeout_s, self._header_deadline)

        # Header fields are counted once they are all in (uvicorn's on_header collects
        # them), not one callback each: their bytes are bounded all along
        # (max_header_bytes), and no request reaches the application before this.
        def on_headers_complete(self) -> None:
            # A header block that came whole in this read (or completed in it) passes the
            # check after each read; what came since the request began, body bytes of the
            # same read included, bounds it, so it is measured only when that is over.
            if self._header_bytes > limits.max_header_bytes and (
                len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
                > limits.max_header_bytes
            ):
                self._refusal = (
                    431, "header_too_large",
                    f"request headers exceed {limits.max_header_bytes} bytes", "header_too_large",
                )  # fmt: skip
                raise _Refusal
            if len(self.headers) > limits.max_headers:
                self._refusal = (
                    431, "header_too_large",
                    f"more than {limits.max_headers} header fields", "too_many_headers",
                )  # fmt: skip
                raise _Refusal
            self._reading_headers = False
            self._header_bytes = 0
            self._request_bytes = 0
            # The timers of every request: cancelled and set here without the helpers'
            # calls (_arm, _disarm), which were a dozen Python calls a request.
            if self._timer is not None:
                self._timer.cancel()
            super().on_headers_complete()
            if self.cycle is not None:
                extensions = self.cycle.scope.setdefault("extensions", {})
                extensions[DISCONNECTED] = self.loop.create_future()
            self._timer = self.loop.call_later(limits.body_idle_timeout_s, self._body_idle)

        def on_response_complete(self) -> None:
            self._out.hold_next()
            super().on_response_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._reading_headers = True

        # Timers --------------------------------------------------------------------

        def _arm(self, delay: float, callback: Any) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _header_deadline(self) -> None:
            self._timer = None
            if self._refused or not self._reading_headers or self.transport.is_closing():
                return
            if self._request_bytes == 0:
                # Nothing of a request came: an idle or abandoned connection, not a client
                # waiting for an answer.
                metrics.connections_refused.labels("header_timeout").inc()
                self.transport.close()
                return
            self._refuse(
                408, "request_timeout",
                f"request headers not complete within {limits.header_timeout_s:g} s",
                "header_timeout",
            )  # fmt: skip

        def _body_idle(self) -> None:
            self._timer = None
            cycle = self.cycle
            if self._refused or cycle is None or not cycle.more_body or cycle.response_complete:
                return
            idle = self.loop.time() - self._last_data
            # Reading paused by flow control (the application has not read what came) is
            # the server's wait, not the client's.
            if self.flow.read_paused or idle < limits.body_idle_timeout_s:
                self._arm(max(0.05, limits.body_idle_timeout_s - idle), self._body_idle)
                return
            self._refuse(
                408, "request_timeout",
                f"no request body data for {limits.body_idle_timeout_s:g} s",
                "body_timeout",
            )  # fmt: skip

        # Refusing ------------------------------------------------------------------

        def _refuse(self, status: int, code: str, message: str, reason: str) -> None:
            self._refused = True
            self._disarm()
            metrics.connections_refused.labels(reason).inc()
            refusals.note(reason, message)
            cycle = self.cycle
            answered = cycle is not None and cycle.response_started
            if cycle is not None:
                # The application, if it runs, sees a client that is gone: its answer
                # goes nowhere, and what it waits for from the body ends.
                cycle.disconnected = True
                cycle.message_event.set()
                self._gone()
            if not answered:
                body = orjson.dumps({"error": {"code": code, "message": message}})
                head = [
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n",
                ]
                if status == 503:
                    head.append(b"retry-after: 1\r\n")
                self.transport.write(b"".join([*head, b"\r\n", body]))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return GuardedHttpProtocol
