"""The REST API as requests and answers, apart from how they are sent: ``Client`` and
``AsyncClient`` share everything here and differ only in waiting."""

from __future__ import annotations

import base64
import email.utils
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from resnet_serve.client.errors import ConnectError, RequestTimeoutError, ServeError, from_answer
from resnet_serve.client.images import ImageLike, Part, encode_all

NPY = "application/x-npy"


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float  # softmax probability


@dataclass(frozen=True)
class Call:
    """One request, and how to read its answer."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    files: list[Part] | None = None
    batch: bool = True  # whether the caller gave several images (and gets a list back)


def model_path(model: str | None, action: str) -> str:
    if model is None:
        return f"/v1/{action}"
    # Dots too: "." and ".." as path segments would be resolved away on the way.
    return f"/v1/models/{quote(model, safe='').replace('.', '%2E')}/{action}"


def classify_call(images: ImageLike | Sequence[ImageLike], model: str | None, top_k: int) -> Call:
    files, batch = encode_all(images)
    return Call("POST", model_path(model, "classify"), {"top_k": top_k}, files, batch)


def embed_call(
    images: ImageLike | Sequence[ImageLike], model: str | None, layer: str | None,
    pool: str | None, normalize: bool,
) -> Call:  # fmt: skip
    files, batch = encode_all(images)
    params: dict[str, Any] = {"encoding": "base64", "normalize": str(normalize).lower()}
    if layer is not None:
        params["layer"] = layer
    if pool is not None:
        params["pool"] = pool
    return Call("POST", model_path(model, "embed"), params, files, batch)


def predictions(call: Call, body: dict[str, Any]) -> Any:
    results = [[Prediction(**p) for p in r["predictions"]] for r in body["results"]]
    return results if call.batch else results[0]


def embeddings(call: Call, response: httpx.Response) -> np.ndarray:
    """float32 ``[N, D]`` (or ``[N, C, H, W]`` for maps), ``[D]`` for one image."""
    if response.headers.get("content-type", "").startswith(NPY):
        # Answers too large for JSON come as .npy, whatever was asked.
        array = np.load(io.BytesIO(response.content), allow_pickle=False)
    else:
        body = response.json()
        rows = [np.frombuffer(base64.b64decode(e), dtype="<f4") for e in body["embeddings"]]
        array = np.stack(rows).astype(np.float32, copy=False)
        if body.get("shape"):
            array = array.reshape(len(rows), *body["shape"])
    return array if call.batch else array[0]


def error_of(response: httpx.Response) -> ServeError:
    """The typed exception of an error answer."""
    code, message = None, response.reason_phrase or f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        body = None
    # Not always the service's shape: a proxy in front of it answers its own errors.
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message") or message
    elif isinstance(error, str):  # the /v2 shape
        message = error
    return from_answer(response.status_code, code, message, response.headers.get("x-request-id"))


def transport_error(exc: httpx.TransportError) -> ServeError:
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeoutError(f"no answer in time: {exc}", status=0)
    return ConnectError(f"{type(exc).__name__}: {exc}")


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds to wait before retrying a 503 (``Retry-After``: seconds or an HTTP date);
    None when the answer does not invite a retry."""
    if response.status_code != 503:
        return None
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Policy:
    """Timeouts and retries, the same for both clients."""

    timeout_s: float | None = 30.0  # None: no limit (httpx's)
    retries: int = 3  # 503 answers retried at most this many times per call
    max_retry_wait_s: float = 10.0  # a longer Retry-After is waited this long

    def headers(self, api_key: str | None) -> dict[str, str]:
        # The service stops working on a request the client has given up on.
        headers = {}
        if self.timeout_s is not None and math.isfinite(self.timeout_s):
            # At least 1 ms: the service refuses 0 as no time at all.
            headers["X-Request-Timeout-Ms"] = f"{max(1.0, self.timeout_s * 1000):.0f}"
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def retry_in_s(self, response: httpx.Response, attempt: int) -> float | None:
        """After attempt ``attempt`` (0 first) got ``response``: None when it succeeded,
        else the wait before the next attempt; raises the typed error when there is none."""
        if response.is_success:
            return None
        wait = retry_after_s(response)
        if wait is None or attempt >= self.retries:
            raise error_of(response)
        return min(wait, self.max_retry_wait_s)
