"""``Client``: the blocking client, one keep-alive connection pool."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from resnet_serve.client import protocol
from resnet_serve.client.images import ImageLike
from resnet_serve.client.protocol import Call, Policy


class Client:
    """``Client("http://127.0.0.1:8000", api_key=None)``. Errors raise
    ``client.errors.ServeError`` subclasses; 503s are retried as ``Retry-After`` says, at
    most ``retries`` times, each wait at most ``max_retry_wait_s``; each attempt may take
    ``timeout_s``. Use as a context manager, or ``close()``."""

    def __init__(
        self, url: str, api_key: str | None = None, *, timeout_s: float | None = 30.0,
        retries: int = 3, max_retry_wait_s: float = 10.0,
    ) -> None:  # fmt: skip
        self.policy = Policy(timeout_s, retries, max_retry_wait_s)
        self._http = httpx.Client(
            base_url=url.rstrip("/"), timeout=timeout_s, headers=self.policy.headers(api_key)
        )

    def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, files=call.files
                )
            except httpx.TransportError as exc:
                raise protocol.transport_error(exc) from exc
            delay = self.policy.retry_in_s(response, attempt)
            if delay is None:
                return response
            attempt += 1
            time.sleep(delay)

    def models(self) -> dict[str, Any]:
        """``{"default": name, "models": [metadata, ...]}``."""
        return self._send(Call("GET", "/v1/models")).json()

    def classify(
        self, images: ImageLike | Sequence[ImageLike], model: str | None = None, top_k: int = 5
    ) -> Any:
        """Top-k per image: ``list[Prediction]`` for one image, a list of those for a list."""
        call = protocol.classify_call(images, model, top_k)
        return protocol.predictions(call, self._send(call).json())

    def embed(
        self, images: ImageLike | Sequence[ImageLike], model: str | None = None, *,
        layer: str | None = None, pool: str | None = None, normalize: bool = True,
    ) -> np.ndarray:  # fmt: skip
        """float32 ``[D]`` for one image, ``[N, D]`` for a list (maps: ``[N, C, H, W]``)."""
        call = protocol.embed_call(images, model, layer, pool, normalize)
        return protocol.embeddings(call, self._send(call))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
