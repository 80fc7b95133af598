"""What the HTTP codecs take from a request for the core: its deadline (the server's
limit or the client's ``X-Request-Timeout-Ms``, counted from its arrival), a watch that
completes when the client disconnects, and the query parameters as written."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from fastapi import Request

from resnet_serve.service.connections import disconnected
from resnet_serve.service.engine import Engine
from resnet_serve.service.errors import InvalidParameterError
from resnet_serve.service.inputs import header


def engine_of(request: Request) -> Engine:
    return request.app.state.runtime.engine


def query_values(request: Request, names: Iterable[str]) -> dict[str, str]:
    """The query parameters among ``names``, as written (a repeated one: its last value),
    for the codec's own validation; any others are ignored. The query is parsed only when
    there is one: most inference requests have none."""
    if not request.scope.get("query_string"):
        return {}
    query = request.query_params
    return {name: query[name] for name in names if name in query}


def deadline(request: Request, engine: Engine) -> float:
    client_ms: float | None = None
    value = header(request, "x-request-timeout-ms")
    if value is not None:
        # Digits and one decimal point: float() would also take "1_000", "1e3" or "nan".
        number = re.fullmatch(r"[0-9]+(\.[0-9]+)?", value.strip(), re.ASCII)
        client_ms = float(value) if number else -1.0
        if not 0 < client_ms < float("inf"):
            raise InvalidParameterError("X-Request-Timeout-Ms must be a positive number")
    arrival = request.scope.get("state", {}).get("start", time.perf_counter())
    return engine.deadline(arrival, client_ms)


def disconnect_watch(request: Request):  # type: ignore[no-untyped-def]
    """A watch for ``Engine.infer``: the connection's disconnect future where the server is
    ours (service/connections.py); otherwise, with the body consumed, the next ASGI message
    can only be the disconnect."""
    future = disconnected(request.scope)
    if future is not None:
        return lambda: future

    async def until_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return until_disconnect
