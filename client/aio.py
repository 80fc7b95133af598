"""``AsyncClient``: ``Client`` for asyncio, the same calls awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from resnet_serve.client import protocol
from resnet_serve.client.images import ImageLike
from resnet_serve.client.protocol import Call, Policy


class AsyncClient:
    """``async with AsyncClient(url, api_key=None) as c: await c.classify(...)``; the
    options and errors of ``Client``."""

    def __init__(
        self, url: str, api_key: str | None = None, *, timeout_s: float | None = 30.0,
        retries: int = 3, max_retry_wait_s: float = 10.0,
    ) -> None:  # fmt: skip
        self.policy = Policy(timeout_s, retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"), timeout=timeout_s, headers=self.policy.headers(api_key)
        )

    async def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, params=call.params, files=call.files
                )
            except httpx.TransportError as exc:
                raise protocol.transport_error(exc) from exc
            delay = self.policy.retry_in_s(response, attempt)
            if delay is None:
                return response
            attempt += 1
            await asyncio.sleep(delay)

    async def models(self) -> dict[str, Any]:
        return (await self._send(Call("GET", "/v1/models"))).json()

    async def classify(
        self, images: ImageLike | Sequence[ImageLike], model: str | None = None, top_k: int = 5
    ) -> Any:
        call = protocol.classify_call(images, model, top_k)
        return protocol.predictions(call, (await self._send(call)).json())

    async def embed(
        self, images: ImageLike | Sequence[ImageLike], model: str | None = None, *,
        layer: str | None = None, pool: str | None = None, normalize: bool = True,
    ) -> np.ndarray:  # fmt: skip
        call = protocol.embed_call(images, model, layer, pool, normalize)
        return protocol.embeddings(call, await self._send(call))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
