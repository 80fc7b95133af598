"""Health, readiness and metrics. The protocols' routers (``service.v1``, ``service.v2``)
are included by the application beside this one."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from resnet_serve.service.responses import V1, FastJSONResponse, protocol_route

router = APIRouter(route_class=protocol_route(V1))


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
