"""The service's errors as exceptions, one class per error ``code`` it answers with
(``{"error": {"code", "message"}}``), so that callers catch what they can handle."""

from __future__ import annotations

import builtins


class ServeError(Exception):
    """An error answer; ``status`` and ``code`` as the service sent them."""

    status: int = 0
    code: str = "error"

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None,
        request_id: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.request_id = request_id


class BadRequestError(ServeError):
    status, code = 400, "bad_request"


class InvalidImageError(BadRequestError):
    code = "invalid_image"


class UnauthorizedError(ServeError):
    status, code = 401, "unauthorized"


class NotFoundError(ServeError):
    status, code = 404, "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class PayloadTooLargeError(ServeError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaTypeError(ServeError):
    status, code = 415, "unsupported_media_type"


class InvalidParameterError(ServeError):
    status, code = 422, "invalid_parameter"


class UnavailableError(ServeError):
    """503: the client retried as ``Retry-After`` said, as many times as it was allowed."""

    status, code = 503, "unavailable"


class OverloadedError(UnavailableError):
    code = "overloaded"


class NotReadyError(UnavailableError):
    code = "not_ready"


class InferenceFailedError(UnavailableError):
    code = "inference_failed"


class RequestTimeoutError(ServeError, builtins.TimeoutError):
    """The service gave up (504), or the client's own timeout passed first (status 0)."""

    status, code = 504, "timeout"


class MethodNotAllowedError(ServeError):
    """The path exists, not with this method."""

    status, code = 405, "method_not_allowed"


class InternalError(ServeError):
    """A fault of the service's own (logged there with the request's ID)."""

    status, code = 500, "internal"


class ConnectError(ServeError, builtins.ConnectionError):
    """No answer: the service could not be reached, or the connection broke."""

    status, code = 0, "connect"


BY_CODE: dict[str, type[ServeError]] = {
    cls.code: cls
    for cls in (
        BadRequestError, InvalidImageError, UnauthorizedError, NotFoundError,
        ModelNotFoundError, PayloadTooLargeError, UnsupportedMediaTypeError,
        InvalidParameterError, OverloadedError, NotReadyError, InferenceFailedError,
        RequestTimeoutError, MethodNotAllowedError, InternalError,
    )
}  # fmt: skip
BY_STATUS: dict[int, type[ServeError]] = {
    400: BadRequestError, 401: UnauthorizedError, 404: NotFoundError,
    405: MethodNotAllowedError, 413: PayloadTooLargeError, 415: UnsupportedMediaTypeError,
    422: InvalidParameterError, 500: InternalError, 503: UnavailableError,
    504: RequestTimeoutError,
}  # fmt: skip


def from_answer(status: int, code: str | None, message: str, request_id: str | None) -> ServeError:
    """The exception for an error answer: by its code, else by its status."""
    cls = BY_CODE.get(code or "") or BY_STATUS.get(status, ServeError)
    return cls(message, status=status, code=code or cls.code, request_id=request_id)
