"""The Open Inference Protocol (KServe V2) answers: ``postprocess.Outputs`` -> the
inference response (HTTP: JSON, or JSON + binary tensor data), model metadata. The gRPC
servicer (``service.grpc_server``) writes the same tensors (``output_tensors``)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response

from resnet_serve.contract.schema import EMBEDDING, INPUT, LOGITS, PROBABILITIES, ModelSpec
from resnet_serve.service.postprocess import Outputs, top_k
from resnet_serve.service.responses import FastJSONResponse
from resnet_serve.service.v2_codec import HEADER_LENGTH, InferenceRequest, RequestedOutput
from resnet_serve.service.v2_names import ENCODED_SUFFIX, VERSION

__all__ = ["VERSION"]  # re-exported: the front ends' version
PLATFORM = "onnxruntime_onnx"
# Triton's names; the last three are service/triton_http.py's (and the gRPC server's).
EXTENSIONS = (
    "binary_tensor_data", "classification", "model_configuration", "statistics",
    "model_repository",
)  # fmt: skip


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def classify(values: np.ndarray, k: int, labels: tuple[str, ...] | None) -> list[bytes]:
    """Triton's classification extension: per row, the ``k`` highest values, highest
    first, as ``"value:index[:label]"`` (value as C++'s ``std::to_string``: six decimals)."""
    order, top = top_k(values, k)
    out: list[bytes] = []
    for indices, row in zip(order, top, strict=True):
        for i, value in zip(indices, row, strict=True):
            text = f"{value:f}:{i}" + (f":{labels[i]}" if labels else "")
            out.append(text.encode())
    return out


def output_tensors(
    spec: ModelSpec, request: InferenceRequest, outputs: Outputs
) -> list[tuple[RequestedOutput, str, list[int], np.ndarray | list[bytes]]]:
    """Each requested output as (request, datatype, shape, FP32 array or BYTES items):
    what the HTTP and the gRPC encodings both write."""
    out: list[tuple[RequestedOutput, str, list[int], np.ndarray | list[bytes]]] = []
    for req in request.outputs:
        tensor = outputs.tensor(req.name)
        if req.classification:
            k = min(req.classification, tensor.shape[1])
            labels = spec.labels if req.name != EMBEDDING else None
            out.append((req, "BYTES", [tensor.shape[0], k], classify(tensor, k, labels)))
        else:
            out.append((req, "FP32", list(tensor.shape), tensor))
    return out


def encode_response(
    spec: ModelSpec, request: InferenceRequest, results: Outputs, name: str | None = None
) -> Response:
    """JSON, or JSON + binary tensor data (``application/octet-stream`` with
    ``Inference-Header-Content-Length``) when any output is binary; ``name``: the model
    name the request addressed (``spec.name`` or its alias)."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for req, datatype, shape, value in output_tensors(spec, request, results):
        entry: dict[str, Any] = {"name": req.name, "datatype": datatype, "shape": shape}
        data: Any
        if isinstance(value, list):
            raw = serialize_bytes(value) if req.binary else None
            data = [item.decode() for item in value]
        else:
            raw = value.astype("<f4").tobytes() if req.binary else None
            data = np.ascontiguousarray(value).ravel()  # orjson writes numpy natively
        if raw is not None:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": name or spec.name, "model_version": VERSION}
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


def model_metadata(spec: ModelSpec, encoded: bool = False) -> dict[str, Any]:
    """The model's metadata; ``encoded``: its alias's (service/v2_names.py), whose one
    input is encoded image files, ``BYTES [-1, 1]``."""
    # A tensor has one datatype in the protocol's metadata: the model lists the UINT8 form
    # of `images`; BYTES [N] (encoded files) is this server's convenience, listed only by
    # the alias.
    classes = [-1, spec.num_classes]
    if encoded:
        image = {"name": INPUT, "datatype": "BYTES", "shape": [-1, 1]}
    else:
        image = {"name": INPUT, "datatype": "UINT8", "shape": [-1, *spec.input_shape]}
    return {
        "name": spec.name + ENCODED_SUFFIX if encoded else spec.name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [image],
        "outputs": [
            {"name": LOGITS, "datatype": "FP32", "shape": classes},
            {"name": PROBABILITIES, "datatype": "FP32", "shape": classes},
            {"name": EMBEDDING, "datatype": "FP32", "shape": [-1, spec.embedding_dim]},
            *(
                {"name": f.name, "datatype": "FP32", "shape": [-1, *f.shape[1:]]}
                for f in spec.features.values()
            ),
        ],
    }
