"""The inference routes' direct path through the application.

A request for a route that reads its own parameters (``protocol_route(own_parameters=True)``:
classification, embeddings, V2 inference) goes through the service's own middleware (request
IDs, metrics and access log, ``Server-Timing``, CORS, API keys: the application's
``user_middleware``, in its order) straight to the route's handler. What it skips, and why
nothing is lost on these routes:

- FastAPI's outermost error middleware: ``RequestMiddleware`` answers an unhandled error
  itself (500, logged once), inside the request ID and metrics;
- FastAPI's OpenTelemetry (its request spans and metrics, its exception-telemetry
  middleware): off unless a provider is configured in the process, and then the direct
  path is not taken (``ServiceApp._traced``);
- FastAPI's body-size middleware: no ``max_body_size`` is set; ``--max-body-bytes`` is
  enforced while the body is read;
- the exception middleware and its handlers: the routes answer their own errors in their
  protocol's shape (``protocol_route``), so none reaches it;
- the exit-stack middleware and ``request_response``'s exit stacks: they close uploaded
  files and dependencies with ``yield``; these routes take neither;
- the scan of the whole route table.

Each of those is a few microseconds of Python on the event loop; with the routes reading
their own parameters, the event loop's CPU per request fell by 20-29% with a small model
(docs/benchmarks.md, "fifth session").
Everything else (other methods and paths, lifespan, websockets) goes to FastAPI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
TRACED_RECHECK_S = 1.0


def direct_handler(route: object) -> Handler | None:
    """The handler of a route that reads its own parameters, set by ``protocol_route``."""
    return getattr(route, "direct_handler", None)


class DirectPath:
    """Matches the direct routes (POST only) and runs them under ``app``'s user middleware;
    ``None`` from ``match`` when the request is not for one of them."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.routes = [
            r
            for r in app.router.routes
            if isinstance(r, APIRoute) and direct_handler(r) is not None and "POST" in r.methods
        ]
        inner: ASGIApp = self._handle
        for cls, args, kwargs in reversed(app.user_middleware):
            inner = cls(inner, *args, **kwargs)
        self.stack = inner

        # The routes without path parameters, by path, where none before them in the table
        # takes their path: a dict lookup instead of a regular expression per route.
        self.static: dict[str, APIRoute] = {}
        for route in self.routes:
            if not route.param_convertors and self._first(route.path) is route:
                self.static[route.path] = route

    def _first(self, path: str) -> APIRoute | None:
        scope = {"type": "http", "method": "POST", "path": path, "root_path": ""}
        return next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)

    def match(self, scope: Scope) -> Scope | None:
        """The route's scope additions (its path parameters, the route itself)."""
        if scope["method"] != "POST":
            return None
        if not scope.get("root_path"):
            route = self.static.get(scope["path"])
            if route is not None:
                return {"endpoint": route.endpoint, "path_params": {}, "route": route}
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return {**child, "route": route}
        return None

    @staticmethod
    async def _handle(scope: Scope, receive: Receive, send: Send) -> None:
        handler = direct_handler(scope["route"])
        assert handler is not None  # only direct routes are matched
        response = await handler(Request(scope, receive, send))
        await response(scope, receive, send)


class ServiceApp(FastAPI):
    """FastAPI, with the direct path for the inference routes. Built with Starlette's own
    middleware stack, on the first call (the lifespan's, under uvicorn): the routes and
    middleware are final by then, and ``add_middleware`` refuses any later addition."""

    _direct: DirectPath | None = None
    _traced_now = False
    _traced_until = float("-inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        if self._direct is None:
            self._direct = DirectPath(self)
        if scope["type"] == "http" and not self._traced():
            if self.root_path:
                scope["root_path"] = self.root_path
            child = self._direct.match(scope)
            if child is not None:
                scope["app"] = self
                scope.update(child)
                await self._direct.stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _traced(self) -> bool:
        """FastAPI's own OpenTelemetry is on: it switches itself on once a tracer, meter or
        logger provider is set (``opentelemetry-instrument``, an SDK configured in the
        process), and then spans and measures every request it serves. The inference
        routes then take FastAPI's path too, so that none is missing from the traces.
        Asked at most every ``TRACED_RECHECK_S``: the answer walks OpenTelemetry's global
        providers (a dozen Python calls), and providers are set once, at startup."""
        now = time.monotonic()
        if now >= self._traced_until:
            telemetry = getattr(self, "_native_telemetry", None)
            self._traced_now = telemetry is not None and bool(telemetry.enabled())
            self._traced_until = now + TRACED_RECHECK_S
        return self._traced_now
