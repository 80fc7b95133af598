"""The API's documentation pages, ``/docs`` (swagger-ui) and ``/redoc``, from files this
package ships (``service/static/``, vendored by tools/docs_assets.py): FastAPI's defaults
load them from a CDN, and render blank pages where there is no internet.

The pages use relative URLs only, so that they work behind a reverse proxy that serves the
service under a path prefix. With ``--api-keys`` the schema declares the bearer scheme on
the operations that need a key, which gives swagger-ui its Authorize button.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from resnet_serve.service.auth import is_open
from resnet_serve.service.errors import RouteNotFoundError
from resnet_serve.service.routes import include
from resnet_serve.service.settings import Settings

BEARER = "bearer"
# The shipped files change only with the package: revalidated (ETag), never stale.
CACHE_CONTROL = "no-cache"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@functools.cache
def static_dir() -> Path:
    return Path(str(resources.files(__package__) / "static"))


@functools.cache
def _assets() -> frozenset[str]:
    # Read once, on the first request for an asset: a name outside this set is a 404,
    # whatever it holds (dots, encoded slashes).
    return frozenset(p.name for p in static_dir().iterdir() if p.is_file())


@functools.cache
def page(name: str) -> bytes:
    return (static_dir() / name).read_bytes()


def html(name: str) -> HTMLResponse:
    return HTMLResponse(page(name), headers={"Cache-Control": CACHE_CONTROL})


router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> Response:
    return html("docs.html")


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> Response:
    return html("oauth2-redirect.html")


@router.get("/redoc")
async def redoc() -> Response:
    return html("redoc.html")


@router.get("/static/{name}")
async def asset(request: Request, name: str) -> Response:
    if name not in _assets():
        raise RouteNotFoundError(f"no such file: {name}")
    path = static_dir() / name
    response = FileResponse(
        path,
        media_type=MEDIA_TYPES.get(path.suffix),
        headers={"Cache-Control": CACHE_CONTROL},
        stat_result=path.stat(),  # sets the ETag now, for the comparison below
    )
    # FileResponse sets the ETag; the conditional answer is ours to give.
    if request.headers.get("if-none-match") == response.headers["etag"]:
        return Response(status_code=304, headers={"ETag": response.headers["etag"]})
    return response


def add_bearer_scheme(schema: dict[str, Any], metrics_require_key: bool) -> dict[str, Any]:
    """The bearer scheme, required by every operation the auth middleware guards."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "one of the keys given with --api-keys",
    }
    for path, operations in schema.get("paths", {}).items():
        if is_open(path, metrics_require_key):
            continue
        for operation in operations.values():
            operation["security"] = [{BEARER: []}]
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """The pages and their assets; create the app with ``docs_url=None, redoc_url=None``."""
    include(app, router)
    if not settings.api_keys:
        return
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_bearer_scheme(generate(), settings.metrics_require_key)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
