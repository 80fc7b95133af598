"""Triton's model configuration, statistics and repository extensions over HTTP, at
Triton's paths, answered as Triton answers them (service/triton_ext.py builds the
documents). perf_analyzer reads the configuration before it starts and the statistics
around each measurement window."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from resnet_serve.service.errors import BadRequestError
from resnet_serve.service.inputs import read_body
from resnet_serve.service.responses import FastJSONResponse
from resnet_serve.service.runtime import Runtime
from resnet_serve.service.triton_ext import config_of, index_of, statistics_of
from resnet_serve.service.v2 import V2Error
from resnet_serve.service.v2_names import V2Model, every_model, resolve

# A repository index request is a small JSON object; anything larger is not one.
MAX_INDEX_BODY_BYTES = 64 * 1024

router = APIRouter(tags=["v2"])
NOT_FOUND = {404: {"model": V2Error, "description": "unknown model or version"}}
BAD_REQUEST = {400: {"model": V2Error, "description": "not a repository index request"}}


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _model(request: Request, name: str) -> V2Model:
    """The path's model (and version), labelled on the request for metrics and logs."""
    model = resolve(_runtime(request).engine, name, request.path_params.get("version"))
    request.state.model = model.served.name
    return model


@router.get("/v2/models/{model}/versions/{version}/config", include_in_schema=False)
@router.get(
    "/v2/models/{model}/config", response_model=dict[str, Any], responses=NOT_FOUND,
    summary="Triton model configuration (model_config.proto's ModelConfig)",
)  # fmt: skip
async def model_config(request: Request, model: str) -> Response:
    runtime = _runtime(request)
    return FastJSONResponse(config_of(runtime, _model(request, model)))


# Before /v2/models/{model} is matched with model="stats": this router is included first.
@router.get(
    "/v2/models/stats", response_model=dict[str, Any],
    summary="Triton statistics of every served model (ModelStatisticsResponse)",
)  # fmt: skip
async def all_statistics(request: Request) -> Response:
    runtime = _runtime(request)
    return FastJSONResponse(statistics_of(runtime, every_model(runtime.models)))


@router.get("/v2/models/{model}/versions/{version}/stats", include_in_schema=False)
@router.get(
    "/v2/models/{model}/stats", response_model=dict[str, Any], responses=NOT_FOUND,
    summary="Triton statistics of one model (ModelStatisticsResponse)",
)  # fmt: skip
async def model_statistics(request: Request, model: str) -> Response:
    runtime = _runtime(request)
    return FastJSONResponse(statistics_of(runtime, [_model(request, model)]))


def _index_request(body: bytes) -> bool:
    """``ready`` of a repository index request; an empty body asks for every model."""
    if not body.strip():
        return False
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"invalid JSON in the repository index request: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequestError("the repository index request must be a JSON object")
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequestError("'ready' must be a boolean")
    return ready


@router.post(
    "/v2/repository/index", response_model=list[IndexEntry], responses=BAD_REQUEST,
    summary="Triton repository index: the served models; body {\"ready\": true}: ready ones",
)  # fmt: skip
async def repository_index(request: Request) -> Response:
    ready = _index_request(await read_body(request, MAX_INDEX_BODY_BYTES))
    return FastJSONResponse(index_of(_runtime(request), ready))
