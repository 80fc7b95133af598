"""The Open Inference Protocol (KServe V2), as NVIDIA Triton implements it: an inference
request over HTTP (JSON, or JSON + binary tensor data) -> ``engine.Job``. Pure functions;
``service.v2_encode`` writes the answers.

Each model has one input, ``images``: already preprocessed ``UINT8 [N, crop, crop, 3]``
(straight into the batcher) or encoded image files as ``BYTES [N]`` (decoded, resized and
cropped as /v1 does); and three outputs: ``logits`` and ``probabilities`` (softmax)
``FP32 [N, classes]``, ``embedding`` ``FP32 [N, dim]`` (the pooled features, not normalised).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from resnet_serve.contract.schema import INPUT, VECTOR_OUTPUTS, ModelSpec
from resnet_serve.service.engine import Job
from resnet_serve.service.errors import BadRequestError
from resnet_serve.service.inputs import decode_base64_image, decode_content, too_many
from resnet_serve.service.v2_lists import leaves, nested_as

OUTPUTS = VECTOR_OUTPUTS
HEADER_LENGTH = "Inference-Header-Content-Length"

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


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview | None]:
    """The JSON header and the binary tensor data after it (``None`` without the
    ``Inference-Header-Content-Length`` header: the whole body is JSON)."""
    binary: memoryview | None = None
    if header_length is not None:
        # Digits only: int() would also take "+120", " 120" and "1_20".
        length = int(header_length) if header_length.isascii() and header_length.isdigit() else -1
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


def uint8_images(data: Any, raw: memoryview | None, shape: list[int]) -> np.ndarray:
    where = f"input '{INPUT}'"
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count:
            raise BadRequestError(
                f"{where}: {len(raw)} bytes of UINT8 data for shape {shape}, expected {count}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    if isinstance(data, list) and data and not isinstance(data[0], list):  # flat
        if len(data) != count:
            got = len(data)
            raise BadRequestError(f"{where}: {got} values for shape {shape}, expected {count}")
    elif isinstance(data, list) and not nested_as(data, shape):
        raise BadRequestError(f"{where}: 'data' does not hold the {count} values of shape {shape}")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequestError(f"{where}: 'data' is not a regular array of numbers") from None
    if values.size != count:
        raise BadRequestError(f"{where}: {values.size} values for shape {shape}, expected {count}")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise BadRequestError(f"{where}: UINT8 data must be integers from 0 to 255")
    return values.astype(np.uint8).reshape(shape)


def encoded_images(data: Any, raw: memoryview | None, count: int) -> list[bytes]:
    where = f"input '{INPUT}'"
    if raw is not None:
        items = deserialize_bytes(raw, count)
    else:
        # JSON cannot carry raw bytes; like tritonclient's JSON mode, each element is a
        # string, and for images that string is base64 (as in /v1's JSON form).
        items = [decode_base64_image(i, item) for i, item in enumerate(leaves(data, count))]
    if len(items) != count:
        found = f"more than {count}" if len(items) > count else str(len(items))
        raise BadRequestError(f"{where}: {found} BYTES elements for shape [{count}]")
    return items


def check_input(
    datatype: Any, shape: list[int], spec: ModelSpec, max_images: int, encoded: bool = False
) -> int:
    """The image count of input ``images`` with this datatype and shape (either
    transport's); 400 for a datatype or shape the model (``encoded``: its alias, which
    takes encoded files only) does not take, 413 past the limit."""
    where = f"input '{INPUT}'"
    expected = "[N, {}]".format(", ".join(map(str, spec.input_shape)))
    if encoded and datatype != "BYTES":
        raise BadRequestError(
            f"{where}: this name of model {spec.name!r} takes encoded image files only, "
            f"BYTES [N] or [N, 1]; got {datatype} (send UINT8 to {spec.name!r})"
        )
    if datatype == "UINT8":
        if len(shape) != 4 or tuple(shape[1:]) != spec.input_shape:
            raise BadRequestError(f"{where}: UINT8 shape must be {expected}, got {shape}")
    elif datatype == "BYTES":
        # [N, 1]: one file per batch item, as a model whose dims are [1] gets it.
        if len(shape) not in (1, 2) or shape[1:] not in ([], [1]):
            raise BadRequestError(f"{where}: BYTES shape must be [N] or [N, 1], got {shape}")
    else:
        raise BadRequestError(
            f"{where}: datatype {datatype} is not supported; send UINT8 {expected} "
            "(preprocessed images) or BYTES [N] (encoded image files)"
        )
    count = shape[0]
    if count == 0:
        raise BadRequestError(f"{where} holds no images")
    if count > max_images:
        raise too_many(count, max_images)
    return count


def _images(
    inp: dict[str, Any], binary: memoryview | None, spec: ModelSpec, max_images: int, encoded: bool
) -> np.ndarray | list[bytes]:
    where = f"input '{INPUT}'"
    datatype, shape = inp.get("datatype"), inp.get("shape")
    if not isinstance(shape, list) or not all(_uint(d) for d in shape):
        raise BadRequestError(f"{where}: 'shape' must be a list of non-negative integers")
    count = check_input(datatype, shape, spec, max_images, encoded)
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
        return uint8_images(inp.get("data"), raw, shape)
    return encoded_images(inp.get("data"), raw, count)


def _output_names(spec: ModelSpec) -> tuple[str, ...]:
    """The protocol's outputs: ours, ``probabilities``, and any exported stage maps."""
    return (*OUTPUTS, *spec.features)


def _outputs(requested: Any, binary_default: bool, spec: ModelSpec) -> list[RequestedOutput]:
    if not requested:
        return default_outputs(binary_default)
    if not isinstance(requested, list):
        raise BadRequestError("'outputs' must be a list")
    out: list[RequestedOutput] = []
    for item in requested:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequestError("each of 'outputs' must be an object with a string 'name'")
        name = item["name"]
        where = f"output '{name}'"
        params = _parameters(item, where)
        k = params.get("classification", 0)
        binary = _flag(params, "binary_data", where, binary_default)
        out.append(requested_output(spec, name, k, binary, out))
    return out


def default_outputs(binary: bool) -> list[RequestedOutput]:
    """Absent or empty ``outputs``: every output but stage maps (large, opt-in)."""
    return [RequestedOutput(name, binary) for name in OUTPUTS]


def requested_output(
    spec: ModelSpec, name: str, k: Any, binary: bool, earlier: list[RequestedOutput]
) -> RequestedOutput:
    """One requested output, checked against the model and those ``earlier``."""
    names = _output_names(spec)
    if name not in names:
        raise BadRequestError(
            f"unexpected inference output {name!r} for model {spec.name!r}; "
            f"its outputs are {', '.join(names)}"
        )
    if any(o.name == name for o in earlier):
        raise BadRequestError(f"output {name!r} requested twice")
    where = f"output '{name}'"
    if not _uint(k):
        raise BadRequestError(f"{where}: 'classification' must be a non-negative integer")
    if k and name in spec.features:
        raise BadRequestError(
            f"{where}: 'classification' applies to vector outputs "
            f"({', '.join(OUTPUTS)}), not to the stage map '{name}'"
        )
    return RequestedOutput(name, binary, k)


def parse_request(
    body: bytes | memoryview,
    *,
    header_length: str | None,
    content_encoding: str | None,
    spec: ModelSpec,
    max_images: int,
    max_body_bytes: int,
    encoded: bool = False,
) -> InferenceRequest:
    """An inference request body (JSON, or JSON + binary tensor data) for model ``spec``
    (``encoded``: its alias); every fault of the client's is a 400 (413 past the limits)
    naming the field."""
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
    images = _images(inputs[0], binary, spec, max_images, encoded)
    outputs = _outputs(doc.get("outputs"), binary_default, spec)
    return InferenceRequest(request_id or None, images, outputs)


def job(request: InferenceRequest) -> Job:
    return Job(request.images, tuple(o.name for o in request.outputs), request=request)
