"""A response's head and body leave in one write (service/transport.py), on its own and
inside resnet-serve's HTTP protocol (service/connections.py), with nothing reordered."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn
from starlette.responses import Response, StreamingResponse
from uvicorn.server import ServerState

from resnet_serve.service.connections import ConnectionLimits, guarded_protocol
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.transport import CoalescingTransport


class Recorder:
    """A transport that records what is sent on it, one entry per send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.calls: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self._alive()
        self.sent.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self._alive()
        self.sent.append(b"".join(chunks))

    def _alive(self) -> None:
        if self.closing:  # as uvloop's transports do
            raise RuntimeError("unable to perform operation on a closed transport")

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(fn)
    def test() -> None:
        asyncio.run(fn())

    return test


async def _turn() -> None:
    await asyncio.sleep(0)


def _holding(head: bytes) -> tuple[Recorder, CoalescingTransport]:
    """A coalescing transport on a recorder, ``head`` written and held."""
    raw = Recorder()
    out = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    out.hold_next()
    out.write(head)
    return raw, out


@run
async def test_a_held_head_goes_out_with_the_next_write() -> None:
    raw, out = _holding(b"head|")
    assert raw.sent == []
    out.write(b"body")
    out.write(b"more")
    assert raw.sent == [b"head|body", b"more"]
    await _turn()
    assert raw.sent == [b"head|body", b"more"]  # the flush found nothing left


@run
async def test_a_head_with_nothing_after_it_goes_out_at_the_next_turn() -> None:
    raw, out = _holding(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    await _turn()
    await _turn()
    assert raw.sent == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
    out.write(b"next")  # held only once per hold_next
    assert raw.sent[-1] == b"next"


@run
async def test_100_continue_goes_at_once_and_the_final_head_is_held() -> None:
    # Was: the interim line took the hold, so the answer's head and body went in two sends.
    continue_ = b"HTTP/1.1 100 Continue\r\n\r\n"
    raw, out = _holding(continue_)
    assert raw.sent == [continue_]  # the client waits for it before sending its body
    out.write(b"HTTP/1.1 200 OK\r\n\r\n")
    out.write(b"body")
    assert raw.sent == [continue_, b"HTTP/1.1 200 OK\r\n\r\nbody"]


@run
async def test_whatever_acts_on_the_connection_sends_what_is_held_first() -> None:
    for act in ("close", "write_eof", "writelines"):
        raw, out = _holding(b"head")
        if act == "writelines":
            out.writelines([b"a", b"b"])
            assert raw.sent == [b"head", b"ab"]
        else:
            getattr(out, act)()
            assert raw.sent == [b"head"] and raw.calls == [act]


@run
async def test_nothing_is_written_to_a_connection_already_closing() -> None:
    raw, _ = _holding(b"head")
    raw.closing = True  # the peer went away meanwhile
    await _turn()
    await _turn()
    assert raw.sent == []


@run
async def test_an_answer_to_a_client_gone_is_dropped_not_raised() -> None:
    # Was: a pipelined request's answer, its client gone (uvicorn marks only the newest
    # request of a connection as disconnected), raised from uvloop: a 500 and a traceback.
    raw, out = _holding(b"head")
    raw.closing = True
    out.write(b"body")
    out.writelines([b"more"])
    out.write(b"again")
    assert raw.sent == []


def _connection(app: Any, request: bytes) -> tuple[Any, Recorder]:
    """resnet-serve's HTTP protocol on a recording transport, ``request`` received."""
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    config.load()
    limits = ConnectionLimits(
        max_header_bytes=8192, max_headers=100, header_timeout_s=5.0,
        body_idle_timeout_s=5.0, max_connections=10,
    )  # fmt: skip
    protocol = guarded_protocol(limits, Metrics())(  # type: ignore[call-arg]
        config=config, server_state=ServerState(), app_state={}
    )
    raw = Recorder()
    protocol.connection_made(raw)
    protocol.data_received(request)
    return protocol, raw


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await _turn()


REQUEST = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


@run
async def test_an_answer_leaves_in_one_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await Response(b'{"ok":true}', media_type="application/json")(scope, receive, send)

    protocol, raw = _connection(app, REQUEST + REQUEST)  # two, kept alive
    await _turns()
    assert len(raw.sent) == 2  # one write each
    for sent in raw.sent:
        head, _, body = sent.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"ok":true}'
    protocol.connection_lost(None)


@run
async def test_a_streamed_answer_sends_its_head_before_its_body_is_ready() -> None:
    body_ready = asyncio.Event()

    async def chunks() -> Any:
        await body_ready.wait()
        yield b"late"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await StreamingResponse(chunks(), media_type="text/plain")(scope, receive, send)

    protocol, raw = _connection(app, REQUEST)
    await _turns()
    assert len(raw.sent) == 1  # the head, on its own, while the body waits
    assert raw.sent[0].startswith(b"HTTP/1.1 200 OK") and raw.sent[0].endswith(b"\r\n\r\n")
    body_ready.set()
    await _turns()
    assert b"late" in b"".join(raw.sent[1:])
    protocol.connection_lost(None)
