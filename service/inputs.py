"""Reading the images of a request: multipart ``file`` parts, a raw ``image/*`` body,
or JSON ``{"images": [base64, ...]}``, plus the parameters each form can carry."""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from starlette.datastructures import UploadFile

from service.errors import (
    BadRequestError,
    InvalidImageError,
    InvalidParameterError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)

RAW_TYPES = ("image/", "application/octet-stream")


@dataclass
class Payload:
    images: list[bytes]
    params: dict[str, Any] = field(default_factory=dict)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (not after buffering)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body without its ``Content-Encoding`` (tritonclient's
    ``request_compression_algorithm``), inflated to at most ``limit`` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding} is not supported (gzip, deflate)",
            headers={"Accept-Encoding": "gzip, deflate"},
        )
    # HTTP's "deflate" is the zlib format (what tritonclient sends); 16+ selects gzip's.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)  # bounded: a small bomb stays small
    except zlib.error as exc:
        raise BadRequestError(f"invalid {encoding} body: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"request body exceeds {limit} bytes once decompressed")
    if not inflater.eof:
        raise BadRequestError(f"truncated {encoding} body")
    return out


def decode_base64_image(index: int, item: Any) -> bytes:
    """One image sent as a base64 string (data URLs tolerated); errors name its position."""
    if not isinstance(item, str):
        raise InvalidImageError(index, "expected a base64 string")
    if item.startswith("data:") and "," in item:
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(index, "invalid base64") from None


def _from_json(body: bytes) -> Payload:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InvalidParameterError('JSON body must be an object with "images": [base64, ...]')
    images = [decode_base64_image(i, item) for i, item in enumerate(doc["images"])]
    params = {k: v for k, v in doc.items() if k != "images"}
    return Payload(images, params)


async def _from_multipart(request: Request, body: bytes, max_files: int) -> Payload:
    # The body was already read within the size limit; parse that buffer, not the socket.
    async def replay():  # type: ignore[no-untyped-def]
        return {"type": "http.request", "body": body, "more_body": False}

    replayed = Request(request.scope, replay)
    try:
        form = await replayed.form(max_files=max_files + 1, max_fields=64)
    except Exception as exc:  # malformed multipart is the client's input
        message = str(getattr(exc, "detail", exc))
        if message.startswith("Too many files"):
            # One limit, one answer: the same 413 as a count just over it.
            raise PayloadTooLargeError(
                f"more than {max_files} images in one request; the limit is {max_files}"
            ) from None
        raise BadRequestError(f"invalid multipart body: {message}") from None
    images: list[bytes] = []
    params: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in ("file", "files", "image", "images"):
                    images.append(await value.read())
            else:
                params[key] = value
    finally:
        await form.close()
    return Payload(images, params)


async def read_payload(request: Request, *, max_body_bytes: int, max_images: int) -> Payload:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype in ("application/json", "multipart/form-data") or ctype.startswith(RAW_TYPES)):
        raise UnsupportedMediaTypeError(
            f"content type {ctype or '(none)'} is not supported: send multipart/form-data "
            "with file parts, a raw image/* body, or application/json with base64 images"
        )
    body = await read_body(request, max_body_bytes)
    if ctype == "application/json":
        payload = _from_json(body)
    elif ctype == "multipart/form-data":
        payload = await _from_multipart(request, body, max_images)
    else:
        payload = Payload([body])
    if not payload.images:
        raise InvalidParameterError("the request holds no images")
    if len(payload.images) > max_images:
        raise PayloadTooLargeError(
            f"{len(payload.images)} images in one request; the limit is {max_images}"
        )
    return payload
