"""Every error the service answers with, and the one table that says how each protocol
answers it.

The core and the codecs raise these (and preprocessing's image errors, which the
contract defines because the build step shares that code); ``answer(exc)`` looks the
class up in ``TABLE``: the HTTP status of /v1 and of the Open Inference Protocol (V2),
the /v1 error code and the gRPC status code. The body shapes are ``v1_body`` and
``v2_body``. No handler rewrites a status and no body is picked by a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from resnet_serve.contract.preprocess import (
    ImageError,
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedImageFormatError,
)

__all__ = [
    "ImageTooLargeError",
    "InvalidImageError",
    "UnsupportedImageFormatError",
]


class ServeError(Exception):
    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequestError(ServeError):
    """Malformed protocol input (JSON, framing, tensor shapes)."""


class UnauthorizedError(ServeError):
    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelNotFoundError(ServeError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; available: {', '.join(known) or 'none'}")


class RouteNotFoundError(ServeError):
    """No such path (or method) in the protocol."""


class MethodNotAllowedError(ServeError):
    pass


class PayloadTooLargeError(ServeError):
    pass


class UnsupportedMediaTypeError(ServeError):
    pass


class InvalidParameterError(ServeError):
    pass


class OverloadedError(ServeError):
    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReadyError(ServeError):
    def __init__(self, message: str = "the service is not ready") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class InferenceFailedError(ServeError):
    """The model failed on a batch; only that batch's requests see this."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class RequestTimeoutError(ServeError):
    pass


class InternalError(ServeError):
    pass


@dataclass(frozen=True)
class Answer:
    http: int  # /v1
    v2_http: int  # the Open Inference Protocol over HTTP (Triton: client faults are 400)
    code: str  # /v1's error code
    grpc: str  # grpc.StatusCode's name (grpc is an optional extra: not imported here)


# Most specific first is not needed: lookup walks each class's MRO.
TABLE: dict[type[Exception], Answer] = {
    InvalidImageError: Answer(400, 400, "invalid_image", "INVALID_ARGUMENT"),
    ImageTooLargeError: Answer(413, 413, "payload_too_large", "RESOURCE_EXHAUSTED"),
    UnsupportedImageFormatError: Answer(415, 415, "unsupported_media_type", "INVALID_ARGUMENT"),
    BadRequestError: Answer(400, 400, "bad_request", "INVALID_ARGUMENT"),
    UnauthorizedError: Answer(401, 401, "unauthorized", "UNAUTHENTICATED"),
    ModelNotFoundError: Answer(404, 404, "model_not_found", "NOT_FOUND"),
    RouteNotFoundError: Answer(404, 404, "not_found", "UNIMPLEMENTED"),
    MethodNotAllowedError: Answer(405, 405, "method_not_allowed", "UNIMPLEMENTED"),
    PayloadTooLargeError: Answer(413, 413, "payload_too_large", "RESOURCE_EXHAUSTED"),
    UnsupportedMediaTypeError: Answer(415, 415, "unsupported_media_type", "INVALID_ARGUMENT"),
    InvalidParameterError: Answer(422, 400, "invalid_parameter", "INVALID_ARGUMENT"),
    OverloadedError: Answer(503, 503, "overloaded", "UNAVAILABLE"),
    NotReadyError: Answer(503, 503, "not_ready", "UNAVAILABLE"),
    InferenceFailedError: Answer(503, 503, "inference_failed", "UNAVAILABLE"),
    RequestTimeoutError: Answer(504, 504, "timeout", "DEADLINE_EXCEEDED"),
    InternalError: Answer(500, 500, "internal", "INTERNAL"),
}
CLIENT_ERRORS = (ServeError, ImageError)


def answer(exc: BaseException) -> Answer:
    for cls in type(exc).__mro__:
        row = TABLE.get(cls)
        if row is not None:
            return row
    return TABLE[InternalError]


def message(exc: BaseException) -> str:
    return str(getattr(exc, "message", "internal error"))


def headers(exc: BaseException) -> dict[str, str]:
    return dict(getattr(exc, "headers", None) or {})


def v1_body(exc: BaseException) -> dict[str, Any]:
    return {"error": {"code": answer(exc).code, "message": message(exc)}}


def v2_body(exc: BaseException) -> dict[str, Any]:
    return {"error": message(exc)}
