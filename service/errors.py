"""Every error the service answers with, one class per HTTP status meaning.

Routes and workers raise these; one handler in ``app.py`` turns them into
``{"error": {"code": ..., "message": ...}}`` with the class's status code.
"""

from __future__ import annotations


class ServeError(Exception):
    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidImageError(ServeError):
    """An image that cannot be decoded; names its position in the request."""

    status = 400
    code = "invalid_image"

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index


class BadRequestError(ServeError):
    status = 400
    code = "bad_request"


class UnauthorizedError(ServeError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelNotFoundError(ServeError):
    status = 404
    code = "model_not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; available: {', '.join(known) or 'none'}")


class NotFoundError(ServeError):
    """A path that names nothing served (a file the docs pages do not ship)."""

    status = 404
    code = "not_found"


class PayloadTooLargeError(ServeError):
    status = 413
    code = "payload_too_large"


class ImageTooLargeError(PayloadTooLargeError):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index


class UnsupportedMediaTypeError(ServeError):
    status = 415
    code = "unsupported_media_type"


class UnsupportedImageFormatError(UnsupportedMediaTypeError):
    def __init__(self, index: int, fmt: str, allowed: list[str]) -> None:
        super().__init__(
            f"image {index}: format {fmt} is not accepted (accepted: {', '.join(allowed)})"
        )
        self.index = index


class InvalidParameterError(ServeError):
    status = 422
    code = "invalid_parameter"


class OverloadedError(ServeError):
    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReadyError(ServeError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str = "the service is not ready") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class InferenceFailedError(ServeError):
    """The model failed on a batch; only that batch's requests see this."""

    status = 503
    code = "inference_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class RequestTimeoutError(ServeError):
    status = 504
    code = "timeout"
