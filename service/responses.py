"""Responses shared by the HTTP codecs: orjson JSON, and the error answer of each
protocol, from the one error table (``service.errors``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from resnet_serve.service.errors import (
    CLIENT_ERRORS,
    BadRequestError,
    InternalError,
    InvalidParameterError,
    MethodNotAllowedError,
    RouteNotFoundError,
    answer,
    v1_body,
    v2_body,
)
from resnet_serve.service.errors import headers as error_headers

log = logging.getLogger(__name__)
V1, V2 = "v1", "v2"


class FastJSONResponse(JSONResponse):
    """orjson, which writes numpy arrays natively: embeddings cost a copy, not a loop."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(exc: BaseException, protocol: str) -> FastJSONResponse:
    """``protocol``'s error answer: /v1's ``{"error": {"code", "message"}}`` or the Open
    Inference Protocol's ``{"error": "message"}``, with the table's status."""
    row = answer(exc)
    if protocol == V2:
        body, status = v2_body(exc), row.v2_http
    else:
        body, status = v1_body(exc), row.http
    return FastJSONResponse(body, status_code=status, headers=error_headers(exc) or None)


def validation_error(exc: RequestValidationError) -> InvalidParameterError:
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return InvalidParameterError(detail or "invalid request")


def protocol_of(path: str) -> str:
    """The protocol of an answer given before any route matched (no such path, a missing
    API key): the one whose namespace the path is in. Routes know their own."""
    return V2 if path == "/v2" or path.startswith("/v2/") else V1


def protocol_route(protocol: str, *, own_parameters: bool = False) -> type[APIRoute]:
    """A route class whose errors are answered in ``protocol``'s shape: every route of a
    codec's router answers its own errors, so nothing downstream rewrites them.

    ``own_parameters``: the endpoint is called with the request and its path parameters
    alone, and reads and validates its query parameters itself (as the inference routes
    do anyway, with the body's parameters, by one set of strict rules): FastAPI's own
    resolution of them cost event loop CPU on every request for nothing (docs/benchmarks.md,
    "fifth session"). The signature and the route's ``dependencies`` still document them
    in the OpenAPI schema; ``service.direct`` runs these routes' handlers directly."""

    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = None if own_parameters else super().get_route_handler()
            endpoint = self.endpoint

            async def answer_errors(request: Request) -> Response:
                try:
                    if handler is None:  # the request and its path parameters alone
                        return await endpoint(request, **request.path_params)  # type: ignore[no-any-return]
                    return await handler(request)
                except CLIENT_ERRORS as exc:
                    return error_response(exc, protocol)
                except RequestValidationError as exc:
                    return error_response(validation_error(exc), protocol)
                except ClientDisconnect:
                    # The client left while sending its body: nobody to answer. 499 is
                    # nginx's code for it, and what the metrics and access log record.
                    return Response(status_code=499)
                except Exception:
                    log.exception("unhandled error on %s %s", request.method, request.url.path)
                    return error_response(InternalError("internal error"), protocol)

            if own_parameters:
                self.direct_handler = answer_errors  # service.direct runs it as it is
            return answer_errors

    return ProtocolRoute


def add_error_handlers(app: FastAPI) -> None:
    """Routes answer their own errors in their protocol's shape (``protocol_route``);
    these handlers are for answers given before any route matched."""
    for kind in CLIENT_ERRORS:

        @app.exception_handler(kind)
        async def serve_error(request: Request, exc: Exception) -> Any:
            return error_response(exc, protocol_of(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Any:
        return error_response(validation_error(exc), protocol_of(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        kind = {404: RouteNotFoundError, 405: MethodNotAllowedError}.get(
            exc.status_code, BadRequestError
        )
        error = kind(str(exc.detail), headers=getattr(exc, "headers", None))
        return error_response(error, protocol_of(request.url.path))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Any:
        # The client left while sending its body: nobody to answer. 499 is nginx's code
        # for it, and what the metrics and access log record.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError("internal error"), protocol_of(request.url.path))
