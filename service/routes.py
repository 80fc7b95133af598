"""HTTP endpoints: classification, embeddings, model metadata, health, metrics."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from service.batcher import Result
from service.errors import InvalidParameterError, RequestTimeoutError
from service.inputs import read_payload
from service.postprocess import encode_embeddings, l2_normalize, pool_maps, to_npy, top_k
from service.responses import FastJSONResponse
from service.runtime import Runtime, ServedModel

# --- schemas: documentation of the answers, and validation of body parameters ---


class Prediction(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResult(BaseModel):
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassifyResult] = Field(description="one per image, in request order")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    encoding: Literal["float", "base64"] = "float"
    layer: str | None = None
    pool: str | None = None
    shape: list[int] | None = Field(None, description="[C, H, W] of each map when pool=none")
    embeddings: list[list[float]] | list[str] = Field(
        description="one per image, in request order; base64 of little-endian float32 "
        "when encoding=base64; feature maps flattened in C, H, W order"
    )


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def _whole_number(value: Any) -> Any:
    """An integer as written: JSON ``true`` or ``1.0``, or text ``1.0`` or ``1_0``, is
    not one (pydantic's lax mode would take them as 1, 1 and 10)."""
    if isinstance(value, bool | float) or (
        isinstance(value, str) and not re.fullmatch(r"-?[0-9]+", value, re.ASCII)
    ):
        raise ValueError("must be an integer, written in digits")
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class ClassifyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: WholeNumber = Field(5, ge=1)


class EmbedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = True
    encoding: Literal["float", "base64"] = "float"
    layer: str | None = None
    pool: Literal["avg", "max", "gem", "none"] = "avg"
    # GeM's exponent where it computes: near 0 every x**p rounds to 1 (a constant vector),
    # and past 20 it is max pooling in all but name (and x**p heads for overflow).
    p: float = Field(3.0, ge=0.5, le=20)

    @field_validator("layer")
    @classmethod
    def _default_layer(cls, value: str | None) -> str | None:
        # "embedding" (or nothing) is the default pooled vector, not a stage.
        return None if value in (None, "", "embedding") else value

    def output(self) -> str:
        return self.layer or "embedding"


def _params(cls: type[BaseModel], query: dict[str, Any], body: dict[str, Any]) -> Any:
    # A parameter in the body (JSON field or multipart form field) wins over the query.
    try:
        return cls.model_validate({**query, **body})
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidParameterError(detail) from None


_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}
                    },
                    "required": ["images"],
                    "additionalProperties": True,
                }
            },
        },
    }
}
NPY = "application/x-npy"
_NPY: dict[int | str, dict[str, Any]] = {
    200: {"content": {NPY: {}}, "description": "with Accept: application/x-npy, or maps too "
          "large for JSON (see --json-max-floats): a .npy array, numpy.load reads it"}
}  # fmt: skip
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "an image could not be decoded (the message names which)",
        404: "unknown model",
        413: "body, image count or image size over the limit",
        415: "unsupported content type or image format",
        422: "invalid parameters",
        503: "overloaded (Retry-After) or not ready",
        504: "timed out",
    }.items()
}


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def _until_disconnect(request: Request) -> None:
    # With the body consumed, the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _timeout_s(request: Request, default_ms: float) -> float:
    """What is left of the request's time: the server's limit or the client's shorter
    ``X-Request-Timeout-Ms``, counted from the request's arrival."""
    limit_ms = default_ms
    header = request.headers.get("x-request-timeout-ms")
    if header is not None:
        # Digits and one decimal point: float() would also take "1_000", "1e3" or "nan".
        number = re.fullmatch(r"[0-9]+(\.[0-9]+)?", header.strip(), re.ASCII)
        client_ms = float(header) if number else -1.0
        if not 0 < client_ms < float("inf"):
            raise InvalidParameterError("X-Request-Timeout-Ms must be a positive number")
        limit_ms = min(limit_ms, client_ms)
    elapsed = time.perf_counter() - request.scope.get("state", {}).get("start", time.perf_counter())
    return max(0.0, limit_ms / 1000.0 - elapsed)


async def _run_guarded(
    request: Request, model: ServedModel, images: int, start: Callable[[], Awaitable[list[Result]]]
) -> list[Result]:
    """Inference of ``images`` images (``start()``: ``Runtime.infer`` or ``infer_arrays``)
    bounded by the request timeout and by the client staying connected; either way out
    cancels the queued work so that it is never computed."""
    runtime = _runtime(request)
    timeout = _timeout_s(request, runtime.settings.request_timeout_ms)
    work = asyncio.ensure_future(start())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {work, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    if watcher in done:
        runtime.metrics.rejected.labels(model.name, "client_gone").inc(images)
        # Nobody is listening; the status is for the logs and metrics only.
        raise RequestTimeoutError("client disconnected")
    raise RequestTimeoutError(f"request timed out after {timeout:g}s")


async def _infer_request(
    request: Request,
    model_name: str | None,
    endpoint: str,
    params_cls: type[BaseModel],
    query: dict[str, Any],
    outputs: Callable[[Any], tuple[str, ...]],
) -> tuple[ServedModel, Any, list[Result]]:
    """The common path of the inference endpoints: model, body, parameters, results
    (``outputs(params)``: the graph outputs the answer needs)."""
    runtime = _runtime(request)
    model = runtime.get(model_name)
    request.state.model = model.name
    # Announced before the body is read, so that batches forming now wait for it.
    expectation = runtime.batcher(model).expect()
    try:
        s = runtime.settings
        payload = await read_payload(
            request, max_body_bytes=s.max_body_bytes, max_images=s.max_images_per_request
        )
        runtime.metrics.images.labels(endpoint, model.name).inc(len(payload.images))
        params = _params(params_cls, query, payload.params)
        infer = functools.partial(
            runtime.infer, model, payload.images, expectation, outputs(params)
        )
        results = await _run_guarded(request, model, len(payload.images), infer)
    finally:
        expectation.done()
    return model, params, results


def _wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "")


router = APIRouter()


async def _classify(request: Request, model_name: str | None, top_k_q: int) -> Response:
    # The query's text, not FastAPI's lax int (which takes "1.0" as 1), is validated.
    query = {"top_k": request.query_params.get("top_k", top_k_q)}
    model, params, results = await _infer_request(
        request, model_name, "classify", ClassifyParams, query, lambda _: ("logits",)
    )
    labels = model.spec.labels
    if _wants_npy(request):
        return Response(to_npy(np.stack([r["logits"] for r in results])), media_type=NPY)
    body = {
        "model": model.name,
        "results": [{"predictions": top_k(r["logits"], params.top_k, labels)} for r in results],
    }
    return FastJSONResponse(body)


async def _embed(request: Request, model_name: str | None, query: dict[str, Any]) -> Response:
    spec = _runtime(request).get(model_name).spec

    def outputs(params: EmbedParams) -> tuple[str, ...]:
        if params.layer is None and params.pool != "avg":
            raise InvalidParameterError(
                "pool applies to a stage (layer=...); the default embedding is already "
                "average-pooled"
            )
        vector = params.layer in spec.output_names and params.layer not in spec.features
        if vector and params.pool != "none":
            # logits: a vector per image, no positions to pool over.
            stages = ", ".join(spec.features) or "none exported"
            raise InvalidParameterError(
                f"layer {params.layer!r} is a vector, not a feature map: pool applies "
                f"to stages ({stages}); ask for it with pool=none"
            )
        return (params.output(),)

    model, params, results = await _infer_request(
        request, model_name, "embed", EmbedParams, query, outputs
    )
    array = np.stack([r[params.output()] for r in results])
    if params.layer is not None and params.pool != "none":
        array = pool_maps(array, params.pool, params.p)
    if array.ndim == 2 and params.normalize:
        array = l2_normalize(array)
    s = _runtime(request).settings
    # Feature maps get large fast (ResNet-50's layer1: 800k floats an image); past the
    # limit they come as .npy, as they do for any answer with Accept: application/x-npy.
    if _wants_npy(request) or array.size > s.json_max_floats:
        return Response(to_npy(array), media_type=NPY, headers={"X-Model": model.name})
    rows = array.reshape(len(array), -1) if array.ndim > 2 else array
    body = {
        "model": model.name,
        "dim": int(array.shape[1]),
        "encoding": params.encoding,
        "embeddings": encode_embeddings(rows, params.encoding),
    }
    if array.ndim > 2:
        body |= {"layer": params.layer, "shape": list(array.shape[1:])}
    elif params.layer is not None:
        body |= {"layer": params.layer, "pool": params.pool}
    return FastJSONResponse(body)


TopK = Query(5, ge=1, description="how many classes per image")


@router.post(
    "/v1/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY,
    tags=["inference"], summary="Classify images with the default model",
)  # fmt: skip
async def classify_default(request: Request, top_k: int = TopK) -> Response:
    return await _classify(request, None, top_k)


@router.post(
    "/v1/models/{model}/classify", response_model=ClassifyResponse, responses=_ERRORS,
    openapi_extra=_IMAGE_BODY, tags=["inference"], summary="Classify images",
)  # fmt: skip
async def classify(request: Request, model: str, top_k: int = TopK) -> Response:
    return await _classify(request, model, top_k)


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
) -> dict[str, Any]:
    return {"normalize": normalize, "encoding": encoding, "layer": layer, "pool": pool, "p": p}


EmbedQuery = Annotated[dict[str, Any], Depends(_embed_query)]


@router.post(
    "/v1/embed", response_model=EmbedResponse, responses=_ERRORS | _NPY,
    openapi_extra=_IMAGE_BODY, tags=["inference"],
    summary="Backbone features (pooled embedding or a stage) with the default model",
)  # fmt: skip
async def embed_default(request: Request, query: EmbedQuery) -> Response:
    return await _embed(request, None, query)


@router.post(
    "/v1/models/{model}/embed", response_model=EmbedResponse, responses=_ERRORS | _NPY,
    openapi_extra=_IMAGE_BODY, tags=["inference"],
    summary="Backbone features (pooled embedding or a stage)",
)  # fmt: skip
async def embed(request: Request, model: str, query: EmbedQuery) -> Response:
    return await _embed(request, model, query)


@router.get(
    "/v1/models", tags=["models"],
    summary="The served models (labels omitted) and the default one (the model of "
    "/v1/classify and /v1/embed)",
)  # fmt: skip
async def list_models(request: Request) -> Response:
    runtime = _runtime(request)
    models = [
        {**m.spec.summary(), **m.status(), "default": name == runtime.default_model}
        for name, m in runtime.models.items()
    ]
    return FastJSONResponse({"default": runtime.default_model, "models": models})


@router.get(
    "/v1/models/{model}", tags=["models"], summary="One model's metadata", responses=_ERRORS
)
async def get_model(request: Request, model: str) -> Response:
    runtime = _runtime(request)
    served = runtime.get(model)
    request.state.model = served.name
    return FastJSONResponse({**served.spec.metadata, **served.status()})


@router.get("/healthz", tags=["health"], summary="The process is alive")
async def healthz() -> Response:
    return FastJSONResponse({"status": "ok"})


@router.get("/readyz", tags=["health"], summary="200 once every model is loaded and warmed up")
async def readyz(request: Request) -> Response:
    runtime = _runtime(request)
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
    registry = _runtime(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
