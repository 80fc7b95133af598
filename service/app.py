"""``create_app(settings)``: the FastAPI application, its lifespan and error handling."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import routing as fastapi_routing
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import docs, logs, ui
from service.auth import AuthMiddleware
from service.errors import InternalError, NotReadyError, ServeError
from service.metrics import Metrics, status_class
from service.responses import FastJSONResponse, add_error_handlers, error_response, protocol_of
from service.routes import router
from service.runtime import Runtime
from service.settings import Settings
from service.timing import TimingMiddleware
from service.triton_http import router as triton_router
from service.v1 import router as v1_router
from service.v2 import router as v2_router

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
                message = {**message, "headers": headers}
            await send(message)

        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["start"] = start
        token = logs.request_id.set(request_id)
        api = scope["path"].startswith(("/v1/", "/v2/"))  # not probes and scrapes
        if api:
            self.traffic.accepted += 1
        self.metrics.in_flight.inc()
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
            self.metrics.in_flight.dec()
            duration = time.perf_counter() - start
            endpoint, named = endpoint_of(scope["path"])
            model = self._model(scope, state, named)
            self.metrics.requests.labels(endpoint, model, str(status)).inc()
            if api and endpoint != UNKNOWN:
                histogram = self.metrics.request_duration
                histogram.labels(endpoint, model, status_class(status)).observe(duration)
            if self.access_log and (status >= 400 or endpoint not in QUIET):
                logs.access.info(
                    "%s %s %d", scope["method"], scope["path"][:MAX_LOGGED_PATH], status,
                    extra={"status": status, "endpoint": endpoint, "model": model,
                           "duration_ms": round(duration * 1000, 3)},
                )  # fmt: skip
            logs.request_id.reset(token)


async def _answer(path: str, error: ServeError, send: Send) -> None:
    """``error``'s JSON answer, sent outside the application."""
    response = error_response(error, protocol_of(path))
    response.headers["connection"] = "close"
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


async def _build_routes(app: FastAPI) -> None:
    """FastAPI builds a router's route table on the first request it routes: measured
    ~70 ms, paid by the first client of the service. One request for each router's
    liveness path, straight to the router (no middleware: not counted, no key needed),
    pays it at startup instead."""

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    # And a POST that ends at once (no such model: nothing is decoded, queued or counted),
    # for the body-reading and error paths that probes never take.
    calls = (("GET", "/healthz"), ("GET", "/v2/health/live"),
             ("POST", "/v1/models/-/classify"))  # fmt: skip
    for method, path in calls:
        scope: Scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": b"", "headers": [], "state": {},
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "app": app,
        }  # fmt: skip
        try:
            async with AsyncExitStack() as stack:
                # What FastAPI's own middleware puts in the scope for its dependencies.
                scope["fastapi_middleware_astack"] = stack
                await app.router(scope, receive, send)
        except Exception:  # an optimisation only: the first request pays, as it did
            log.debug("building the routes at startup failed", exc_info=True)
    # FastAPI also reads each endpoint's source position (inspect.getsourcelines: the file is
    # read and tokenized) on the endpoint's first call, for its error context: ~1 ms of a
    # small model's first request. Its cache is filled here when this FastAPI has one.
    extract = getattr(fastapi_routing, "_extract_endpoint_context", None)
    if callable(extract):
        for route in app.routes:
            if isinstance(route, APIRoute):
                with contextlib.suppress(Exception):
                    extract(route.dependant.call)


async def _start_grpc(runtime: Runtime) -> Any:
    """The gRPC front end on --grpc-port (0: none), in this event loop."""
    if not runtime.settings.grpc_port:
        return None
    try:
        # Imported only when on: grpcio and the protocol's stubs are the `grpc` extra.
        from service.grpc_server import GrpcServer
    except ImportError as exc:
        hint = "install the `grpc` extra (pip install 'resnet-serve[grpc]')"
        if "grpc_port" in runtime.settings.model_fields_set:
            raise RuntimeError(f"--grpc-port: {hint}, or set it to 0: {exc}") from None
        # The default port without the extra: HTTP alone, as before the option existed.
        log.warning("gRPC off: %s to serve it on port %d", hint, runtime.settings.grpc_port)
        return None
    server = GrpcServer(runtime)
    await server.start()
    return server


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The service. With ``runtime`` given (already loaded, as the CLI does to fail fast),
    the lifespan only starts and stops it; otherwise it loads it from ``settings``."""
    metrics = runtime.metrics if runtime is not None else Metrics()
    traffic = Traffic()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or await asyncio.to_thread(Runtime.load, settings, metrics)
        app.state.runtime = rt
        await rt.start()
        grpc = await _start_grpc(rt)
        await _build_routes(app)
        try:
            yield
        finally:
            if grpc is not None:
                await grpc.stop()
            await rt.stop()
            # uvicorn has waited for in-flight requests by now: the two counts must match.
            log.info(
                "drained",
                extra={
                    "accepted": traffic.accepted,
                    "answered": traffic.answered,
                    "cut_off_at_drain_timeout": traffic.cut_off,
                },
            )

    app = FastAPI(
        title="resnet-serve",
        version="0.1.0",
        description="Classification and backbone features (embeddings) for the ResNet family, "
        "with dynamic batching on ONNX Runtime.",
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
        docs_url=None,  # service.docs serves them, from local files
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(router)
    app.include_router(v1_router)
    # Before v2's: its /v2/models/{model} would take /v2/models/stats.
    app.include_router(triton_router)
    app.include_router(v2_router)
    docs.install(app, settings)
    if settings.ui:
        ui.install(app)
    # Starlette runs the last added outermost: request IDs and metrics see everything,
    # including 401s and CORS preflights. CORS is outside the keys: a browser's preflight
    # never carries one, and a 401 needs the CORS headers for the page to read it.
    if settings.api_keys:
        app.add_middleware(
            AuthMiddleware,
            keys=settings.api_keys,
            metrics_require_key=settings.metrics_require_key,
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "Server-Timing"],
        )
    app.add_middleware(TimingMiddleware)
    app.add_middleware(
        RequestMiddleware, metrics=metrics, access_log=settings.access_log, traffic=traffic
    )

    add_error_handlers(app)
    return app
