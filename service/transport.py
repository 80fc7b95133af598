"""A connection's transport that sends a response's head and body in one write.

uvicorn writes an answer's status line and headers as soon as the application starts the
response, and its body when the application sends it: two send() calls, two TCP segments
and two wakeups of the client for every answer, though the body nearly always follows in
the same step of the same task. Here the first write of a response (``hold_next()``) is
held and goes out with the next one, as one write; if nothing follows within the event
loop's current turn (a streamed answer, a 100 Continue), it goes out alone at the next.
Everything written on the connection passes through here, so the order never changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


class CoalescingTransport:
    __slots__ = ("_held", "_hold", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._hold = False

    def hold_next(self) -> None:
        """The next write (a response's head) waits for the one after it."""
        self._hold = True

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            # The client is gone; uvloop raises on a closed transport, and uvicorn marks
            # only the newest of pipelined requests as disconnected, so an earlier one's
            # answer still comes here: dropped, as asyncio's own transports drop it.
            self._held = None
            return
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines((held, data))  # one send() for both
        elif self._hold and data.startswith(b"HTTP/1.1 1"):
            # An interim answer (100 Continue): at once, for a client that waits for it
            # before its body; the final answer's head is the one to hold.
            self._transport.write(data)
        elif self._hold:
            self._hold = False
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        self.flush()
        if not self._transport.is_closing():
            self._transport.writelines(chunks)

    def flush(self) -> None:
        """Send what is held, if anything and if the connection is still open."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # Anything else (write_eof, abort, pause_reading, get_extra_info...) acts on the
        # connection after what was written before it.
        self.flush()
        return getattr(self._transport, name)
