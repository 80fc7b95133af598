"""Where one request's time went: preprocess, queue, inference, sent back as a
``Server-Timing`` header (milliseconds), which browsers show in their developer tools and
the demo page reads.

The metrics already time each stage, per image and per batch; this is the same clocks seen
from one request. A request's images are decoded in parallel and may land in more than one
batch: preprocess is the wall time of its decoding, and queue and inference are those of the
image whose result came last (the request's critical path), so the three add up to about the
time the request spent inside the service less the reading of its body.

A context variable, not a parameter: the batcher records into the timing of the request that
submitted the image (captured at submission, carried with the image), and no signature
between the route and the batcher changes.
"""

from __future__ import annotations

import contextvars
import time


class Timing:
    __slots__ = ("_reserved", "_result_at", "inference_s", "preprocess_s", "queue_s")

    def __init__(self) -> None:
        self.preprocess_s: float | None = None
        self.queue_s: float | None = None
        self.inference_s: float | None = None
        self._reserved: float | None = None
        self._result_at = 0.0

    def reserved(self) -> None:
        """The request's images were admitted; their decoding starts."""
        self._reserved = time.perf_counter()

    def submitted(self) -> None:
        """The images are decoded and queued."""
        if self._reserved is not None:
            self.preprocess_s = time.perf_counter() - self._reserved

    def decoded(self, seconds: float) -> None:
        """The image was decoded by the session's thread, in its batch (a lone request)."""
        self.preprocess_s = (self.preprocess_s or 0.0) + seconds

    def batch_done(self, queue_s: float, inference_s: float, end: float) -> None:
        """One of the request's images came out of a batch."""
        if end >= self._result_at:
            self._result_at = end
            self.queue_s, self.inference_s = queue_s, inference_s

    def header(self) -> bytes | None:
        """The ``Server-Timing`` value, or None when nothing was timed (no inference)."""
        parts = []  # a loop, not a comprehension: one Python call less a request
        for name, seconds in (
            ("preprocess", self.preprocess_s),
            ("queue", self.queue_s),
            ("inference", self.inference_s),
        ):
            if seconds is not None:
                parts.append(f"{name};dur={seconds * 1000:.3f}")
        return ", ".join(parts).encode("ascii") if parts else None


_current: contextvars.ContextVar[Timing | None] = contextvars.ContextVar(
    "resnet_serve_timing", default=None
)


# The timing of the request being served by this task, if any: the context variable's own
# (C) getter, no Python frame of its own for every image queued.
current = _current.get


def begin() -> tuple[Timing, contextvars.Token[Timing | None]]:
    """A fresh ``Timing`` for the HTTP request this task serves (``RequestMiddleware``
    sends its header); ``end`` with the token once the answer is sent."""
    timing = Timing()
    return timing, _current.set(timing)


def end(token: contextvars.Token[Timing | None]) -> None:
    _current.reset(token)
