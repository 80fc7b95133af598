"""Response classes shared by every endpoint, errors included."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse

from service.errors import ServeError


class FastJSONResponse(JSONResponse):
    """orjson, which writes numpy arrays natively: embeddings cost a copy, not a loop."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(path: str, exc: ServeError) -> FastJSONResponse:
    """The one shape of every error: ``{"error": {"code", "message"}}``, or the Open
    Inference Protocol's ``{"error": "message"}`` under ``/v2``."""
    if path.startswith("/v2"):
        body: dict[str, Any] = {"error": exc.message}
    else:
        body = {"error": {"code": exc.code, "message": exc.message}}
    return FastJSONResponse(body, status_code=exc.status, headers=exc.headers or None)
