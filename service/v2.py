"""The Open Inference Protocol (KServe V2) over HTTP, as NVIDIA Triton implements it.

Health, server and model metadata and inference, with Triton's binary tensor data and
classification extensions, so that ``tritonclient.http`` and other V2 clients work as they
do against Triton. Each route is parse (``service.v2_codec``) -> core (``Engine.infer``)
-> encode; errors get the protocol's shape from the one table (``service.errors``).
"""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from resnet_serve.contract.schema import ModelSpec
from resnet_serve.service.engine import Job
from resnet_serve.service.httpcall import deadline, disconnect_watch, engine_of
from resnet_serve.service.inputs import INLINE_PARSE_BYTES, header, read_body
from resnet_serve.service.reading import Reading
from resnet_serve.service.responses import V2, FastJSONResponse, protocol_route
from resnet_serve.service.v2_codec import HEADER_LENGTH, job, parse_request
from resnet_serve.service.v2_encode import EXTENSIONS, encode_response, model_metadata
from resnet_serve.service.v2_names import V2Model, resolve

ENDPOINT = "v2_infer"

# --- schemas: documentation of the answers ---


class V2Error(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "not ready",
        404: "unknown model or version",
    }
    return {code: {"model": V2Error, "description": text[code]} for code in codes}


# --- routes: every model route also under /versions/{version} (only VERSION exists) ---

router = APIRouter(tags=["v2"], route_class=protocol_route(V2))
# Inference: no query parameters, and FastAPI's resolution of the path's is skipped.
inference_router = APIRouter(tags=["v2"], route_class=protocol_route(V2, own_parameters=True))


def _served(request: Request, name: str) -> V2Model:
    """The model (and version) of the path, or its alias (service/v2_names.py); the
    request is labelled with the model for the metrics and the access log once it is
    known to be served."""
    model = resolve(engine_of(request), name, request.path_params.get("version"))
    request.state.model = model.served.name
    return model


@router.get(
    "/v2", response_model=ServerMetadata, summary="Server metadata (Open Inference Protocol)"
)
async def server_metadata(request: Request) -> Response:
    body = {"name": "resnet-serve", "version": request.app.version, "extensions": EXTENSIONS}
    return FastJSONResponse(body)


@router.get("/v2/health/live", response_model=Live, summary="200 while the process is alive")
async def server_live() -> Response:
    return FastJSONResponse({"live": True})


@router.get(
    "/v2/health/ready", response_model=Ready, responses=_errors(400),
    summary="200 once every model is warmed up; 400 before that and while draining",
)  # fmt: skip
async def server_ready(request: Request) -> Response:
    # Not ready is a 400, as in Triton (the protocol asks for a 4xx).
    if not request.app.state.runtime.ready:
        return FastJSONResponse({"error": "the service is not ready"}, status_code=400)
    return FastJSONResponse({"ready": True})


@router.get("/v2/models/{model}/versions/{version}", include_in_schema=False)
@router.get(
    "/v2/models/{model}", response_model=ModelMetadata, responses=_errors(404),
    summary="Model metadata: inputs and outputs with datatype and shape",
)  # fmt: skip
async def get_model_metadata(request: Request, model: str) -> Response:
    v2model = _served(request, model)
    return FastJSONResponse(model_metadata(v2model.spec, v2model.encoded))


@router.get("/v2/models/{model}/versions/{version}/ready", include_in_schema=False)
@router.get(
    "/v2/models/{model}/ready", response_model=ModelReady, responses=_errors(400, 404),
    summary="200 when the model can serve; 400 while warming up or draining",
)  # fmt: skip
async def model_ready(request: Request, model: str) -> Response:
    v2model = _served(request, model)
    if not v2model.served.serving or request.app.state.runtime.draining:
        return FastJSONResponse({"error": f"model {v2model.name} is not ready"}, status_code=400)
    return FastJSONResponse({"name": v2model.name, "ready": True})


# Not in the OpenAPI schema: no generated body is a valid tensor, so schema fuzzers learn
# nothing from it; the protocol's own specification and docs/v2.md describe it.
@inference_router.post("/v2/models/{model}/versions/{version}/infer", include_in_schema=False)
@inference_router.post("/v2/models/{model}/infer", include_in_schema=False)
async def infer(request: Request, model: str, version: str | None = None) -> Response:
    # The versioned path passes its version too; _served takes it from the path.
    engine = engine_of(request)
    v2model = _served(request, model)
    limit = deadline(request, engine)
    s = engine.settings

    async def parse(spec: ModelSpec, reading: Reading) -> Job:
        body = await read_body(request, s.max_body_bytes, reading)
        run = functools.partial(
            parse_request, body,
            header_length=header(request, HEADER_LENGTH),
            content_encoding=header(request, "content-encoding"),
            spec=spec, max_images=s.max_images_per_request, max_body_bytes=s.max_body_bytes,
            encoded=v2model.encoded,
        )  # fmt: skip
        # A compressed body may inflate far past its size: parsed off the loop too.
        inline = len(body) <= INLINE_PARSE_BYTES and not header(request, "content-encoding")
        return job(run() if inline else await engine.parse(run))

    result = await engine.infer(
        v2model.served, parse, endpoint=ENDPOINT, deadline=limit, gone=disconnect_watch(request)
    )
    return encode_response(v2model.spec, result.job.request, result.outputs, v2model.name)
