"""The Open Inference Protocol (KServe V2) over HTTP, as NVIDIA Triton implements it.

Health, server and model metadata and inference, with Triton's binary tensor data and
classification extensions, so that ``tritonclient.http`` and other V2 clients work as they
do against Triton. Inference takes the same path as /v1: the model's batcher, admission,
body/image/pixel limits, the request timeout, client disconnects, keys and metrics.

Each model has one input, ``images``: already preprocessed ``UINT8 [N, crop, crop, 3]``
(straight into the batcher) or encoded image files as ``BYTES [N]`` (decoded, resized and
cropped as /v1 does); and three outputs: ``logits`` and ``probabilities`` (softmax)
``FP32 [N, classes]``, ``embedding`` ``FP32 [N, dim]`` (the pooled features, not normalised).
"""

from __future__ import annotations

import asyncio
import functools
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.batcher import Result
from service.errors import (
    BadRequestError,
    InvalidParameterError,
    ModelNotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from service.inputs import decode_base64_image, read_body
from service.postprocess import softmax
from service.repository import ModelSpec
from service.responses import FastJSONResponse
from service.routes import _run_guarded, _runtime
from service.runtime import ServedModel

VERSION = "1"  # a repository holds one version of each model
PLATFORM = "onnxruntime_onnx"
# Triton's names; the last three are service/triton_http.py's.
EXTENSIONS = (
    "binary_tensor_data", "classification", "model_configuration", "statistics",
    "model_repository",
)  # fmt: skip
INPUT = "images"
OUTPUTS = ("logits", "probabilities", "embedding")
HEADER_LENGTH = "Inference-Header-Content-Length"
ENDPOINT = "v2_infer"
# Bodies above this are parsed in a thread: JSON tensor data costs far more per byte than
# base64, and a large one would stall every other request on the event loop.
INLINE_PARSE_BYTES = 256 * 1024

# --- the request ---


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # > 0: the top-k as "value:index[:label]" instead of the tensor


@dataclass
class InferenceRequest:
    id: str | None
    images: np.ndarray | list[bytes]  # uint8 [N, H, W, 3], or N encoded image files
    outputs: list[RequestedOutput]


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequestError(f"{where}: 'parameters' must be an object")
    if "shared_memory_region" in params:
        raise BadRequestError(f"{where}: the shared-memory extension is not supported")
    return params


def _flag(params: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequestError(f"{where}: parameter '{key}' must be a boolean")
    return value


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body without its ``Content-Encoding`` (tritonclient's
    ``request_compression_algorithm``), inflated to at most ``limit`` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding} is not supported (gzip, deflate)",
            headers={"Accept-Encoding": "gzip, deflate"},
        )
    # HTTP's "deflate" is the zlib format (what tritonclient sends); 16+ selects gzip's.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)  # bounded: a small bomb stays small
    except zlib.error as exc:
        raise BadRequestError(f"invalid {encoding} body: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"request body exceeds {limit} bytes once decompressed")
    if not inflater.eof:
        raise BadRequestError(f"truncated {encoding} body")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview | None]:
    """The JSON header and the binary tensor data after it (``None`` without the
    ``Inference-Header-Content-Length`` header: the whole body is JSON)."""
    binary: memoryview | None = None
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            # 0 would be Triton's raw binary request, which needs a single-datatype input.
            raise BadRequestError(
                f"{HEADER_LENGTH} must be the JSON header's size, from 1 to the body's "
                f"{len(body)} bytes; got {header_length!r}"
            )
        binary = memoryview(body)[length:]
        body = body[:length]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"invalid JSON in the inference request: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequestError("the inference request must be a JSON object")
    return doc, binary


def deserialize_bytes(raw: memoryview | bytes, limit: int) -> list[bytes]:
    """BYTES elements in binary form: each a 4-byte little-endian length, then the bytes.
    Stops past ``limit`` elements, so that a body of empty elements costs nothing."""
    items: list[bytes] = []
    pos = 0
    while pos < len(raw) and len(items) <= limit:
        if pos + 4 > len(raw):
            raise BadRequestError(f"BYTES data truncated in an element's length at byte {pos}")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise BadRequestError(f"BYTES element {len(items)} runs past the end of its data")
        items.append(bytes(raw[pos : pos + size]))
        pos += size
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _leaves(data: Any, limit: int) -> list[Any]:
    """The elements of ``data``, flat or nested lists alike (both are valid V2 ``data``),
    in row-major order; at most ``limit + 1``. Iterative: nesting depth costs no stack."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack and len(out) <= limit:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > limit:
                break
        else:
            stack.pop()
    return out


def _uint8_images(data: Any, raw: memoryview | None, shape: list[int]) -> np.ndarray:
    where = f"input '{INPUT}'"
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count:
            raise BadRequestError(
                f"{where}: {len(raw)} bytes of UINT8 data for shape {shape}, expected {count}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequestError(f"{where}: 'data' is not a regular array of numbers") from None
    if values.size != count:
        raise BadRequestError(f"{where}: {values.size} values for shape {shape}, expected {count}")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise BadRequestError(f"{where}: UINT8 data must be integers from 0 to 255")
    return values.astype(np.uint8).reshape(shape)


def _encoded_images(data: Any, raw: memoryview | None, count: int) -> list[bytes]:
    where = f"input '{INPUT}'"
    if raw is not None:
        items = deserialize_bytes(raw, count)
    else:
        # JSON cannot carry raw bytes; like tritonclient's JSON mode, each element is a
        # string, and for images that string is base64 (as in /v1's JSON form).
        items = [decode_base64_image(i, item) for i, item in enumerate(_leaves(data, count))]
    if len(items) != count:
        found = f"more than {count}" if len(items) > count else str(len(items))
        raise BadRequestError(f"{where}: {found} BYTES elements for shape [{count}]")
    return items


def _images(
    inp: dict[str, Any], binary: memoryview | None, spec: ModelSpec, max_images: int
) -> np.ndarray | list[bytes]:
    where = f"input '{INPUT}'"
    datatype, shape = inp.get("datatype"), inp.get("shape")
    if not isinstance(shape, list) or not all(_uint(d) for d in shape):
        raise BadRequestError(f"{where}: 'shape' must be a list of non-negative integers")
    expected = "[N, {}]".format(", ".join(map(str, spec.input_shape)))
    if datatype == "UINT8":
        if len(shape) != 4 or tuple(shape[1:]) != spec.input_shape:
            raise BadRequestError(f"{where}: UINT8 shape must be {expected}, got {shape}")
    elif datatype == "BYTES":
        if len(shape) != 1:
            raise BadRequestError(f"{where}: BYTES shape must be [N], got {shape}")
    else:
        raise BadRequestError(
            f"{where}: datatype {datatype} is not supported; send UINT8 {expected} "
            "(preprocessed images) or BYTES [N] (encoded image files)"
        )
    count = shape[0]
    if count == 0:
        raise BadRequestError(f"{where} holds no images")
    if count > max_images:
        raise PayloadTooLargeError(f"{count} images in one request; the limit is {max_images}")
    params = _parameters(inp, where)
    raw: memoryview | None = None
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not _uint(size):
            raise BadRequestError(f"{where}: 'binary_data_size' must be a non-negative integer")
        if binary is None:
            raise BadRequestError(
                f"{where} has 'binary_data_size' but the request has no {HEADER_LENGTH} header"
            )
        if size != len(binary):
            raise BadRequestError(
                f"{where}: binary_data_size is {size} but {len(binary)} bytes follow the header"
            )
        raw = binary
    elif binary:
        raise BadRequestError(
            f"{len(binary)} bytes of binary data follow the header but no input has "
            "'binary_data_size'"
        )
    elif "data" not in inp:
        raise BadRequestError(f"{where} has neither 'data' nor parameters.binary_data_size")
    if datatype == "UINT8":
        return _uint8_images(inp.get("data"), raw, shape)
    return _encoded_images(inp.get("data"), raw, count)


def _output_names(spec: ModelSpec) -> tuple[str, ...]:
    """The protocol's outputs: ours, ``probabilities``, and any exported stage maps."""
    return (*OUTPUTS, *spec.features)


def _outputs(requested: Any, binary_default: bool, spec: ModelSpec) -> list[RequestedOutput]:
    names = _output_names(spec)
    if not requested:  # absent or empty: every output but stage maps (large, opt-in)
        return [RequestedOutput(name, binary_default) for name in OUTPUTS]
    if not isinstance(requested, list):
        raise BadRequestError("'outputs' must be a list")
    out: list[RequestedOutput] = []
    for item in requested:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequestError("each of 'outputs' must be an object with a string 'name'")
        name = item["name"]
        if name not in names:
            raise BadRequestError(
                f"unexpected inference output {name!r} for model {spec.name!r}; "
                f"its outputs are {', '.join(names)}"
            )
        if any(o.name == name for o in out):
            raise BadRequestError(f"output {name!r} requested twice")
        where = f"output '{name}'"
        params = _parameters(item, where)
        k = params.get("classification", 0)
        if not _uint(k):
            raise BadRequestError(f"{where}: 'classification' must be a non-negative integer")
        if k and name in spec.features:
            raise BadRequestError(
                f"{where}: 'classification' applies to vector outputs "
                f"({', '.join(OUTPUTS)}), not to the stage map '{name}'"
            )
        out.append(RequestedOutput(name, _flag(params, "binary_data", where, binary_default), k))
    return out


def parse_request(
    body: bytes,
    *,
    header_length: str | None,
    content_encoding: str | None,
    spec: ModelSpec,
    max_images: int,
    max_body_bytes: int,
) -> InferenceRequest:
    """An inference request body (JSON, or JSON + binary tensor data) for model ``spec``;
    every fault of the client's is a 400 (413 past the limits) naming the field."""
    body = decode_content(body, content_encoding, max_body_bytes)
    doc, binary = split_body(body, header_length)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError("'id' must be a string")
    binary_default = _flag(_parameters(doc, "request"), "binary_data_output", "request", False)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequestError("'inputs' must be a non-empty list")
    names = [i.get("name") if isinstance(i, dict) else None for i in inputs]
    for name in names:
        if name != INPUT:
            raise BadRequestError(
                f"unexpected inference input {name!r} for model {spec.name!r}; "
                f"it has one input, '{INPUT}'"
            )
    if len(names) > 1:
        raise BadRequestError(f"input '{INPUT}' given {len(names)} times")
    images = _images(inputs[0], binary, spec, max_images)
    outputs = _outputs(doc.get("outputs"), binary_default, spec)
    return InferenceRequest(request_id or None, images, outputs)


# --- the response ---


def classify(values: np.ndarray, k: int, labels: tuple[str, ...] | None) -> list[bytes]:
    """Triton's classification extension: per row, the ``k`` highest values, highest
    first, as ``"value:index[:label]"`` (value as C++'s ``std::to_string``: six decimals)."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    out: list[bytes] = []
    for row, indices in zip(values, order, strict=True):
        for i in indices:
            text = f"{row[i]:f}:{i}" + (f":{labels[i]}" if labels else "")
            out.append(text.encode())
    return out


def model_outputs(request: InferenceRequest) -> tuple[str, ...]:
    """What the graph must produce for the requested protocol outputs."""
    names = ["logits" if o.name == "probabilities" else o.name for o in request.outputs]
    return tuple(dict.fromkeys(names))


def _tensor(name: str, results: list[Result]) -> np.ndarray:
    source = "logits" if name == "probabilities" else name
    tensor = np.stack([r[source] for r in results]).astype(np.float32, copy=False)
    return softmax(tensor).astype(np.float32) if name == "probabilities" else tensor


def encode_response(spec: ModelSpec, request: InferenceRequest, results: list[Result]) -> Response:
    """JSON, or JSON + binary tensor data (``application/octet-stream`` with
    ``Inference-Header-Content-Length``) when any output is binary."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for req in request.outputs:
        tensor = _tensor(req.name, results)
        entry: dict[str, Any] = {"name": req.name}
        if req.classification:
            k = min(req.classification, tensor.shape[1])
            labels = spec.labels if req.name != "embedding" else None
            items = classify(tensor, k, labels)
            entry |= {"datatype": "BYTES", "shape": [tensor.shape[0], k]}
            raw = serialize_bytes(items) if req.binary else None
            data: Any = [item.decode() for item in items]
        else:
            entry |= {"datatype": "FP32", "shape": list(tensor.shape)}
            raw = tensor.astype("<f4").tobytes() if req.binary else None
            data = np.ascontiguousarray(tensor).ravel()  # orjson writes numpy natively
        if raw is not None:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": spec.name, "model_version": VERSION}
    if request.id:
        doc["id"] = request.id
    doc["outputs"] = outputs
    if not chunks:
        return FastJSONResponse(doc)
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


# --- metadata ---


def model_metadata(spec: ModelSpec) -> dict[str, Any]:
    # Only the UINT8 form of `images` is listed: a tensor has one datatype in the
    # protocol's metadata; BYTES [N] (encoded files) is this server's convenience.
    classes = [-1, spec.num_classes]
    return {
        "name": spec.name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, *spec.input_shape]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": classes},
            {"name": "probabilities", "datatype": "FP32", "shape": classes},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, spec.embedding_dim]},
            *(
                {"name": f.name, "datatype": "FP32", "shape": [-1, *f.shape[1:]]}
                for f in spec.features.values()
            ),
        ],
    }


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

router = APIRouter(tags=["v2"])


def _served(request: Request, name: str) -> ServedModel:
    """The model (and version) of the path; the request is labelled with the model for
    the metrics and the access log once it is known to be served."""
    served = _runtime(request).get(name)
    version = request.path_params.get("version")
    if version is not None and version != VERSION:
        raise ModelNotFoundError(f"{name} version {version}", [f"{name} version {VERSION}"])
    request.state.model = served.name
    return served


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
    if not _runtime(request).ready:
        return FastJSONResponse({"error": "the service is not ready"}, status_code=400)
    return FastJSONResponse({"ready": True})


@router.get("/v2/models/{model}/versions/{version}", include_in_schema=False)
@router.get(
    "/v2/models/{model}", response_model=ModelMetadata, responses=_errors(404),
    summary="Model metadata: inputs and outputs with datatype and shape",
)  # fmt: skip
async def get_model_metadata(request: Request, model: str) -> Response:
    served = _served(request, model)
    return FastJSONResponse(model_metadata(served.spec))


@router.get("/v2/models/{model}/versions/{version}/ready", include_in_schema=False)
@router.get(
    "/v2/models/{model}/ready", response_model=ModelReady, responses=_errors(400, 404),
    summary="200 when the model can serve; 400 while warming up or draining",
)  # fmt: skip
async def model_ready(request: Request, model: str) -> Response:
    served = _served(request, model)
    if not served.serving or _runtime(request).draining:
        return FastJSONResponse({"error": f"model {served.name} is not ready"}, status_code=400)
    return FastJSONResponse({"name": served.name, "ready": True})


# Not in the OpenAPI schema: no generated body is a valid tensor, so schema fuzzers learn
# nothing from it; the protocol's own specification and docs/v2.md describe it.
@router.post("/v2/models/{model}/versions/{version}/infer", include_in_schema=False)
@router.post("/v2/models/{model}/infer", include_in_schema=False)
async def infer(request: Request, model: str) -> Response:
    runtime = _runtime(request)
    served = _served(request, model)
    # Announced before the body is read, so that batches forming now wait for it.
    expectation = runtime.batcher(served).expect()
    try:
        s = runtime.settings
        body = await read_body(request, s.max_body_bytes)
        parse = functools.partial(
            parse_request, body,
            header_length=request.headers.get(HEADER_LENGTH),
            content_encoding=request.headers.get("content-encoding"),
            spec=served.spec, max_images=s.max_images_per_request,
            max_body_bytes=s.max_body_bytes,
        )  # fmt: skip
        parsed = await asyncio.to_thread(parse) if len(body) > INLINE_PARSE_BYTES else parse()
        images = parsed.images
        runtime.metrics.images.labels(ENDPOINT, served.name).inc(len(images))
        infer = runtime.infer_arrays if isinstance(images, np.ndarray) else runtime.infer
        work = functools.partial(infer, served, images, expectation, model_outputs(parsed))
        results = await _run_guarded(request, served, len(images), work)
    except InvalidParameterError as exc:
        # /v1's 422 (an invalid X-Request-Timeout-Ms) is the protocol's 400.
        raise BadRequestError(exc.message, headers=exc.headers) from None
    finally:
        expectation.done()
    return encode_response(served.spec, parsed, results)
