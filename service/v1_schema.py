"""/v1's schemas: the answers (for the OpenAPI document), the body parameters (validated
strictly: ``top_k`` as written, GeM's ``p`` where it computes) and the documented errors."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from resnet_serve.contract.schema import EMBEDDING, POOLS
from resnet_serve.service.errors import InvalidParameterError
from resnet_serve.service.postprocess import Pooling

Pool = Literal["avg", "max", "gem", "none"]
assert set(Pool.__args__) == set(POOLS)  # type: ignore[attr-defined]


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
    pool: Pool = "avg"
    # GeM's exponent where it computes: near 0 every x**p rounds to 1 (a constant vector),
    # and past 20 it is max pooling in all but name (and x**p heads for overflow).
    p: float = Field(3.0, ge=0.5, le=20)

    @field_validator("layer")
    @classmethod
    def _default_layer(cls, value: str | None) -> str | None:
        # "embedding" (or nothing) is the default pooled vector, not a stage.
        return None if value in (None, "", EMBEDDING) else value

    def output(self) -> str:
        return self.layer or EMBEDDING

    def pooling(self) -> Pooling | None:
        if self.layer is None:
            if self.pool != "avg":
                raise InvalidParameterError(
                    "pool applies to a stage (layer=...); the default embedding is already "
                    "average-pooled"
                )
            return None
        return Pooling(self.pool, self.p)


def parse_params(cls: type[BaseModel], query: dict[str, Any], body: dict[str, Any]) -> Any:
    """The parameters: the query's and the body's (JSON fields or multipart form fields),
    the body's winning where both name one. The query is validated on its own first when
    the body has parameters too, so that a bad query value is refused even where the body
    overrides it; its errors are named ``query.<name>``."""
    if query and body:
        _validate(cls, query, "query.")
    return _validate(cls, {**query, **body}, "" if body else "query.")


def _validate(cls: type[BaseModel], values: dict[str, Any], prefix: str) -> Any:
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        detail = "; ".join(
            f"{prefix}{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidParameterError(detail) from None


IMAGE_BODY = {
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
NPY_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {NPY: {}}, "description": "with Accept: application/x-npy, or maps too "
          "large for JSON (see --json-max-floats): a .npy array, numpy.load reads it"}
}  # fmt: skip
ERRORS: dict[int | str, dict[str, Any]] = {
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
