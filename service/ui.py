"""The demo page, at ``/`` and ``/ui``: drop, pick or paste images, see what the model says.

One self-contained HTML file (``static/ui.html``: its script and style inline, nothing
fetched but the API it calls), which uses the public REST API like any client: the
models from ``/v1/models``, top-5 from ``/v1/models/{m}/classify`` with the latency split
from its ``Server-Timing`` header, embeddings from ``/v1/models/{m}/embed`` for the
cosine similarities. Off with ``--no-ui``.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

from resnet_serve.service.docs import html
from resnet_serve.service.routes import include

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/ui")
async def demo() -> Response:
    return html("ui.html")


def install(app: FastAPI) -> None:
    include(app, router)
