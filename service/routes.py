"""Health, readiness and metrics, and ``include``, which puts every router's routes into the
application (the protocols' ``service.v1``, ``service.v2``, ... beside these)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from resnet_serve.service.responses import V1, FastJSONResponse, protocol_route

router = APIRouter(route_class=protocol_route(V1))


def include(app: FastAPI, router: APIRouter) -> None:
    """``router``'s routes as the application's own, in order. Not ``app.include_router``:
    FastAPI keeps an included router as one entry whose route table it checks for changes
    on every request it routes (``_get_routes_version``, once per included router and
    again for the one that matches): 4-8% of the event loop thread's profile samples under
    load with the tiny model (docs/benchmarks.md, "... where a request's CPU goes"). Our routers
    have no prefix, dependencies or other include options, so their routes are the
    same routes either way."""
    app.router.routes.extend(router.routes)


@router.get("/healthz", tags=["health"], summary="The process is alive")
async def healthz() -> Response:
    return FastJSONResponse({"status": "ok"})


@router.get("/readyz", tags=["health"], summary="200 once every model is loaded and warmed up")
async def readyz(request: Request) -> Response:
    runtime = request.app.state.runtime
    body = {
        "ready": runtime.ready,
        "draining": runtime.draining,
        "models": {name: m.serving for name, m in runtime.models.items()},
    }
    return FastJSONResponse(body, status_code=200 if runtime.ready else 503)


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.runtime.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
