"""Optional API keys: ``Authorization: Bearer <key>`` on the model and inference
endpoints; health (and, by default, metrics) stay open for probes and scrapers."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from resnet_serve.service.errors import UnauthorizedError
from resnet_serve.service.responses import error_response, protocol_of

OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/openapi.json",
     # the pages a person opens first, and their files: the key is typed in there
     "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/ui"}
)  # fmt: skip
OPEN_PREFIXES = ("/static/",)


def is_open(path: str, metrics_require_key: bool) -> bool:
    """Whether ``path`` is answered without a key."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return True
    return path == "/metrics" and not metrics_require_key


def key_matches(presented: bytes, keys: list[bytes]) -> bool:
    """Constant time in the presented key: every configured key is compared, always."""
    match = False
    for key in keys:
        match |= hmac.compare_digest(presented, key)
    return match


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], metrics_require_key: bool) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.metrics_require_key = metrics_require_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"], self.metrics_require_key):
            await self.app(scope, receive, send)
            return
        presented = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
                break
        if presented and key_matches(presented, self.keys):
            await self.app(scope, receive, send)
            return
        response = error_response(UnauthorizedError(), protocol_of(scope["path"]))
        await response(scope, receive, send)
