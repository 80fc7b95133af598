"""``create_app(settings)``: the FastAPI application, its lifespan and error handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import routing as fastapi_routing
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Message, Scope

from resnet_serve.service import docs, ui
from resnet_serve.service.auth import AuthMiddleware
from resnet_serve.service.direct import ServiceApp
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.middleware import RequestMiddleware, Traffic
from resnet_serve.service.responses import FastJSONResponse, add_error_handlers
from resnet_serve.service.routes import include, router
from resnet_serve.service.runtime import Runtime
from resnet_serve.service.settings import Settings
from resnet_serve.service.triton_http import router as triton_router
from resnet_serve.service.v1 import inference_router as v1_inference
from resnet_serve.service.v1 import router as v1_router
from resnet_serve.service.v2 import inference_router as v2_inference
from resnet_serve.service.v2 import router as v2_router

log = logging.getLogger(__name__)


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
        from resnet_serve.service.grpc_server import GrpcServer
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

    app = ServiceApp(
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
    include(app, router)
    include(app, v1_inference)
    include(app, v1_router)
    # Before v2's: its /v2/models/{model} would take /v2/models/stats.
    include(app, triton_router)
    include(app, v2_inference)
    include(app, v2_router)
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
    app.add_middleware(
        RequestMiddleware, metrics=metrics, access_log=settings.access_log, traffic=traffic
    )

    add_error_handlers(app)
    return app
