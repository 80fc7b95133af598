"""The /v1 REST API: classification, embeddings and model metadata. Each inference
route is parse (``service.inputs`` + the parameters) -> core (``Engine.infer``) ->
encode; errors get /v1's shape from the one table (``service.errors``)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from resnet_serve.contract.schema import LOGITS, PROBABILITIES, ModelSpec
from resnet_serve.service.engine import Job
from resnet_serve.service.httpcall import deadline, disconnect_watch, engine_of, query_values
from resnet_serve.service.inputs import header, read_payload
from resnet_serve.service.postprocess import encode_embeddings, to_npy, top_k
from resnet_serve.service.reading import Reading
from resnet_serve.service.responses import V1, FastJSONResponse, protocol_route
from resnet_serve.service.v1_schema import (
    ERRORS,
    IMAGE_BODY,
    NPY,
    NPY_ANSWER,
    ClassifyParams,
    ClassifyResponse,
    EmbedParams,
    EmbedResponse,
    parse_params,
)


def _wants_npy(request: Request) -> bool:
    return NPY in (header(request, "accept") or "")


router = APIRouter(route_class=protocol_route(V1))
# Classification and embeddings: their endpoints read their query parameters themselves
# (protocol_route's own_parameters); the query functions below document them.
inference_router = APIRouter(route_class=protocol_route(V1, own_parameters=True))


async def _infer(
    request: Request,
    model_name: str | None,
    endpoint: str,
    params_cls: type[BaseModel],
    query: dict[str, Any],
    job_of: Any,
) -> tuple[Any, Any]:
    """Model, body, parameters, results: ``job_of(images, params)`` says what to compute."""
    engine = engine_of(request)
    model = engine.model(model_name)
    request.state.model = model.name
    limit = deadline(request, engine)
    s = engine.settings
    parsed: dict[str, Any] = {}

    async def parse(spec: ModelSpec, reading: Reading) -> Job:
        payload = await read_payload(
            request,
            max_body_bytes=s.max_body_bytes,
            max_images=s.max_images_per_request,
            offload=engine.parse,
            reading=reading,
        )
        params = parsed["params"] = parse_params(params_cls, query, payload.params)
        return job_of(payload.images, params)

    result = await engine.infer(
        model, parse, endpoint=endpoint, deadline=limit, gone=disconnect_watch(request)
    )
    return result, parsed["params"]


async def _classify(request: Request, model_name: str | None) -> Response:
    # The query's text, not FastAPI's lax int (which takes "1.0" as 1), is validated.
    query = query_values(request, ClassifyParams.model_fields)

    def job_of(images: list[bytes], params: ClassifyParams) -> Job:
        return Job(images, (PROBABILITIES,))

    result, params = await _infer(request, model_name, "classify", ClassifyParams, query, job_of)
    outputs = result.outputs
    if _wants_npy(request):
        return Response(to_npy(outputs.tensor(LOGITS)), media_type=NPY)
    labels = result.model.spec.labels
    indices, scores = top_k(outputs.probabilities(), params.top_k)
    body = {
        "model": result.model.name,
        "results": [
            {
                "predictions": [
                    {"index": int(i), "label": labels[i], "score": float(p)}
                    for i, p in zip(row_i, row_p, strict=True)
                ]
            }
            for row_i, row_p in zip(indices, scores, strict=True)
        ],
    }
    return FastJSONResponse(body)


async def _embed(request: Request, model_name: str | None) -> Response:
    query = query_values(request, EmbedParams.model_fields)

    def job_of(images: list[bytes], params: EmbedParams) -> Job:
        return Job(images, (params.output(),), pooling=params.pooling())

    result, params = await _infer(request, model_name, "embed", EmbedParams, query, job_of)
    array = result.outputs.features(params.output(), result.job.pooling, params.normalize)
    s = engine_of(request).settings
    # Feature maps get large fast (ResNet-50's layer1: 800k floats an image); past the
    # limit they come as .npy, as they do for any answer with Accept: application/x-npy.
    if _wants_npy(request) or array.size > s.json_max_floats:
        return Response(to_npy(array), media_type=NPY, headers={"X-Model": result.model.name})
    rows = array.reshape(len(array), -1) if array.ndim > 2 else array
    body = {
        "model": result.model.name,
        "dim": int(array.shape[1]),
        "encoding": params.encoding,
        "embeddings": encode_embeddings(rows, params.encoding),
    }
    if array.ndim > 2:
        body |= {"layer": params.layer, "shape": list(array.shape[1:])}
    elif params.layer is not None:
        body |= {"layer": params.layer, "pool": params.pool}
    return FastJSONResponse(body)


def _classify_query(
    top_k: int = Query(5, ge=1, description="how many classes per image"),
) -> None:
    """Documents the query parameters: the endpoint reads them itself."""


def _embed_query(
    normalize: bool = Query(True, description="L2-normalise each vector (not feature maps)"),
    encoding: Literal["float", "base64"] = Query(
        "float", description="float: JSON numbers; base64: little-endian float32"
    ),
    layer: str | None = Query(
        None, description="a backbone stage exported with --features (default: the embedding)"
    ),
    pool: Literal["avg", "max", "gem", "none"] = Query(
        "avg", description="pooling of the stage's map; none: the map itself [C, H, W]"
    ),
    p: float = Query(
        3.0, ge=0.5, le=20, description="GeM exponent, 0.5 to 20 (1: average; larger: towards max)"
    ),
) -> None:
    """Documents the query parameters: the endpoint reads them itself."""


CLASSIFY = {"response_model": ClassifyResponse, "responses": ERRORS, "openapi_extra": IMAGE_BODY,
            "tags": ["inference"], "dependencies": [Depends(_classify_query)]}  # fmt: skip
EMBED = CLASSIFY | {"response_model": EmbedResponse, "responses": ERRORS | NPY_ANSWER,
                    "dependencies": [Depends(_embed_query)]}  # fmt: skip


@inference_router.post("/v1/classify", summary="Classify images with the default model", **CLASSIFY)
async def classify_default(request: Request) -> Response:
    return await _classify(request, None)


@inference_router.post("/v1/models/{model}/classify", summary="Classify images", **CLASSIFY)
async def classify(request: Request, model: str) -> Response:
    return await _classify(request, model)


@inference_router.post(
    "/v1/embed",
    summary="Backbone features (pooled embedding or a stage) with the default model",
    **EMBED,
)
async def embed_default(request: Request) -> Response:
    return await _embed(request, None)


@inference_router.post(
    "/v1/models/{model}/embed", summary="Backbone features (pooled embedding or a stage)", **EMBED
)
async def embed(request: Request, model: str) -> Response:
    return await _embed(request, model)


@router.get(
    "/v1/models", tags=["models"],
    summary="The served models (labels omitted) and the default one (the model of "
    "/v1/classify and /v1/embed)",
)  # fmt: skip
async def list_models(request: Request) -> Response:
    runtime = request.app.state.runtime
    models = [
        {**m.spec.summary(), **m.status(), "default": name == runtime.default_model}
        for name, m in runtime.models.items()
    ]
    return FastJSONResponse({"default": runtime.default_model, "models": models})


@router.get("/v1/models/{model}", tags=["models"], summary="One model's metadata", responses=ERRORS)
async def get_model(request: Request, model: str) -> Response:
    served = engine_of(request).model(model)
    request.state.model = served.name
    return FastJSONResponse({**served.spec.metadata, **served.status()})
