"""The request middleware: request IDs, per-request metrics, the access log and the
``Server-Timing`` header (service/timing.py) for every answer, wherever it was given; the
``endpoint`` label table; and the last-resort answers given outside the application (a
bug's 500, a request cut off at the drain timeout)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_serve.service import logs, timing
from resnet_serve.service.errors import InternalError, NotReadyError, ServeError
from resnet_serve.service.metrics import Metrics, status_class
from resnet_serve.service.responses import error_response, protocol_of

log = logging.getLogger(__name__)
# Generated request IDs: a random per-process prefix and a counter, 32 hex digits, unique
# across replicas without uuid4's cost on every request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


@dataclass
class Traffic:
    """API requests (/v1, /v2) the application started (accepted) and finished (answered)."""

    accepted: int = 0
    answered: int = 0
    # Still running when the drain timeout ended: answered 503 by the middleware, not by
    # the application, so not counted as answered.
    cut_off: int = 0


# The `endpoint` label of every route, by path template: a fixed set of values whatever
# paths clients send. No route matched: UNKNOWN. (A test checks that every route is here.)
ENDPOINTS = {
    "/v1/classify": "classify",
    "/v1/models/{model}/classify": "classify",
    "/v1/embed": "embed",
    "/v1/models/{model}/embed": "embed",
    "/v1/models": "models",
    "/v1/models/{model}": "model",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/v2": "v2_server",
    "/v2/health/live": "v2_health",
    "/v2/health/ready": "v2_health",
    "/v2/models/{model}": "v2_model",
    "/v2/models/{model}/versions/{version}": "v2_model",
    "/v2/models/{model}/ready": "v2_model",
    "/v2/models/{model}/versions/{version}/ready": "v2_model",
    "/v2/models/{model}/infer": "v2_infer",
    "/v2/models/{model}/versions/{version}/infer": "v2_infer",
    "/v2/models/{model}/config": "v2_config",
    "/v2/models/{model}/versions/{version}/config": "v2_config",
    "/v2/models/stats": "v2_stats",
    "/v2/models/{model}/stats": "v2_stats",
    "/v2/models/{model}/versions/{version}/stats": "v2_stats",
    "/v2/repository/index": "v2_repository",
    "/openapi.json": "docs",
    "/docs": "docs",
    "/docs/oauth2-redirect": "docs",
    "/redoc": "docs",
    "/static/{name}": "static",
    "/": "ui",
    "/ui": "ui",
}
UNKNOWN = "unknown"
# Probes and scrapes: counted, but access-logged only when they fail (4xx, 5xx); every few
# seconds from each prober, their successes would drown the log.
QUIET = frozenset({"healthz", "readyz", "v2_health", "metrics"})
MAX_LOGGED_PATH = 256
# Matched here, from the table alone, rather than taken from the router's match: answers
# given before routing (401) have none, and the router's internals differ between FastAPI
# versions. A path parameter matches one path segment, as Starlette's does.
_STATIC = {path: label for path, label in ENDPOINTS.items() if "{" not in path}
_TEMPLATES = [
    (re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"), label)
    for path, label in ENDPOINTS.items()
    if "{" in path
]


def endpoint_of(path: str) -> tuple[str, str | None]:
    """(endpoint label, the path's ``{model}`` if it has one) of a request path."""
    label = _STATIC.get(path)
    if label is not None:
        return label, None
    for pattern, label in _TEMPLATES:
        if m := pattern.match(path):
            return label, m.groupdict().get("model")
    return UNKNOWN, None


class RequestMiddleware:
    """Request IDs, the per-request metrics and the access log, for every answer, whatever
    the outcome and wherever it was given (the routes, FastAPI's validation, the auth
    middleware, no route at all). Plain ASGI: no per-request task."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool, traffic: Traffic) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.traffic = traffic

    @staticmethod
    def _model(scope: Scope, state: dict[str, Any], named: str | None) -> str:
        """The served model the request named: set by the route once it resolved the
        model, else the path's ``{model}`` if it is served (never an arbitrary string)."""
        model = state.get("model")
        if model is not None:
            return str(model)
        runtime = getattr(getattr(scope.get("app"), "state", None), "runtime", None)
        return named if runtime is not None and named in runtime.models else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = ""
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
                break
        request_id = request_id or f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                server_timing = request_timing.header()
                if server_timing is not None:
                    headers.append((b"server-timing", server_timing))
                message = {**message, "headers": headers}
            await send(message)

        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["start"] = start
        token = logs.request_id.set(request_id)
        request_timing, timing_token = timing.begin()
        api = scope["path"].startswith(("/v1/", "/v2/"))  # not probes and scrapes
        if api:
            self.traffic.accepted += 1
        self.metrics.requests_in_flight += 1
        cut_off = False
        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when the drain timeout ends, and would answer
            # a plain-text 500: the client gets the service's 503 (retry elsewhere) instead.
            if started:
                raise
            cut_off = True
            stopped = NotReadyError(
                "the service stopped before this request finished (drain timeout); retry"
            )
            await _answer(scope["path"], stopped, send_wrapper)
        except Exception:
            # Handled here, inside the request ID and metrics, and logged once: Starlette's
            # own last-resort handler answers outside them and re-raises, and uvicorn then
            # logs the same traceback a second time.
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                return  # uvicorn closes the connection of an unfinished answer
            await _answer(scope["path"], InternalError("internal error"), send_wrapper)
        finally:
            if cut_off:
                self.traffic.cut_off += 1
            elif api:
                self.traffic.answered += 1
            self.metrics.requests_in_flight -= 1
            duration = time.perf_counter() - start
            endpoint, named = endpoint_of(scope["path"])
            model = self._model(scope, state, named)
            self.metrics.requests_of(endpoint, model, str(status)).inc()
            if api and endpoint != UNKNOWN:
                histogram = self.metrics.request_duration_of
                histogram(endpoint, model, status_class(status)).observe(duration)
            # The level first: the record's arguments are built only for a line written.
            if (
                self.access_log
                and (status >= 400 or endpoint not in QUIET)
                and logs.access.isEnabledFor(logging.INFO)
            ):
                logs.access.info(
                    "%s %s %d", scope["method"], scope["path"][:MAX_LOGGED_PATH], status,
                    extra={"status": status, "endpoint": endpoint, "model": model,
                           "duration_ms": round(duration * 1000, 3)},
                )  # fmt: skip
            timing.end(timing_token)
            logs.request_id.reset(token)


async def _answer(path: str, error: ServeError, send: Send) -> None:
    """``error``'s JSON answer, sent outside the application."""
    response = error_response(error, protocol_of(path))
    response.headers["connection"] = "close"
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
