"""Reading the images of a request: multipart ``file`` parts, a raw ``image/*`` body,
or JSON ``{"images": [base64, ...]}``, plus the parameters each form can carry."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from resnet_serve.service.errors import (
    BadRequestError,
    InvalidImageError,
    InvalidParameterError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from resnet_serve.service.multipart import parse_multipart
from resnet_serve.service.reading import Reading

RAW_TYPES = ("image/", "application/octet-stream")
# Quotes a JSON body may hold besides its images' strings: the parameters' names and
# string values (a handful; unknown ones are refused anyway).
JSON_PARAMETER_QUOTES = 256
# Bodies above this are parsed off the event loop: parsing costs grow with the body (JSON
# far more per byte than base64), and a large one would stall every other request.
INLINE_PARSE_BYTES = 256 * 1024


# The scope's key for its headers as a dict (``header``).
_HEADERS = "resnet_serve.headers"


def header(request: Request, name: str) -> str | None:
    """A request header (the first of repeated ones, as Starlette's ``Headers.get``): the
    headers become a dict once per request, then each is one lookup, not Starlette's scan
    of the list in Python for every header asked for."""
    scope = request.scope
    headers = scope.get(_HEADERS)
    if headers is None:
        headers = scope[_HEADERS] = dict(reversed(scope["headers"]))
    value = headers.get(name.lower().encode("latin-1"))
    return None if value is None else value.decode("latin-1")


@dataclass
class Payload:
    images: list[bytes]
    params: dict[str, Any] = field(default_factory=dict)


async def read_body(request: Request, limit: int, reading: Reading | None = None) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (not after buffering),
    and with 503 once ``reading``'s byte budget is spent (the declared length at once).
    While no bytes arrive for ``reading.stall_s``, batches stop waiting for it."""
    declared = header(request, "content-length")
    known = declared is not None and declared.isdigit()
    if known and int(declared) > limit:  # type: ignore[arg-type]
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds {limit} bytes")
    if reading is not None and known:
        reading.take(int(declared))  # type: ignore[arg-type]
    chunks: list[bytes] = []
    size = 0
    # The ASGI messages themselves, not Starlette's ``request.stream()``: an async
    # generator per request (registered with the loop, then finalised) for the same bytes.
    receive = request.receive
    more = True
    while more:
        message = await _next_message(receive, reading)
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
        if reading is not None and not known:
            reading.take(len(chunk))
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _next_message(receive: Receive, reading: Reading | None) -> Message:
    if reading is None:
        return await receive()
    # A timer, not a task and a wait per chunk: most chunks are there already, and this
    # runs for every chunk of every request on the event loop.
    stalled = False

    def stall() -> None:
        nonlocal stalled
        stalled = True
        reading.stalled()

    timer = asyncio.get_running_loop().call_later(reading.stall_s, stall)
    try:
        return await receive()
    finally:
        timer.cancel()
        if stalled:
            reading.resumed()


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
    if inflater.unused_data:
        # A second gzip member, or trailing bytes: not what any client sends.
        raise BadRequestError(f"data after the end of the {encoding} stream")
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


def too_many(count: int, max_images: int) -> PayloadTooLargeError:
    """The one answer past the image count limit, whatever the protocol."""
    return PayloadTooLargeError(f"{count} images in one request; the limit is {max_images}")


def check_json_count(body: bytes, max_images: int) -> None:
    """Refuse a JSON body with too many images from its quotes alone, before it is parsed
    (a memchr-speed count, no allocation): each image is a string (two quotes) and the few
    parameters add a bounded number more, so millions of tiny images are never built."""
    if body.count(b'"') > 2 * max_images + JSON_PARAMETER_QUOTES:
        raise PayloadTooLargeError(
            f"more than {max_images} images in one request; the limit is {max_images}"
        )


def parse_json_images(body: bytes, max_images: int) -> Payload:
    """``{"images": [base64, ...], ...parameters}``; the image count is checked before any
    image is decoded."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InvalidParameterError('JSON body must be an object with "images": [base64, ...]')
    if len(doc["images"]) > max_images:
        raise too_many(len(doc["images"]), max_images)
    images = [decode_base64_image(i, item) for i, item in enumerate(doc["images"])]
    params = {k: v for k, v in doc.items() if k != "images"}
    return Payload(images, params)


def multipart_payload(content_type: str, body: bytes, max_images: int) -> Payload:
    return Payload(*parse_multipart(content_type, body, max_images))


Offload = Callable[[Callable[[], Payload]], Awaitable[Payload]]


async def inline(parse: Callable[[], Payload]) -> Payload:
    return parse()


async def read_payload(
    request: Request,
    *,
    max_body_bytes: int,
    max_images: int,
    offload: Offload = inline,
    reading: Reading | None = None,
) -> Payload:
    """The images and parameters of a /v1 request. Bodies over ``INLINE_PARSE_BYTES`` are
    parsed by ``offload(parse)`` (``Engine.parse``: off the event loop, a bounded number
    at once)."""
    ctype_full = header(request, "content-type") or ""
    ctype = ctype_full.split(";")[0].strip().lower()
    if not (ctype in ("application/json", "multipart/form-data") or ctype.startswith(RAW_TYPES)):
        raise UnsupportedMediaTypeError(
            f"content type {ctype or '(none)'} is not supported: send multipart/form-data "
            "with file parts, a raw image/* body, or application/json with base64 images"
        )
    body = await read_body(request, max_body_bytes, reading)
    small = len(body) <= INLINE_PARSE_BYTES
    if ctype == "application/json":
        check_json_count(body, max_images)
        parse = functools.partial(parse_json_images, body, max_images)
        payload = parse() if small else await offload(parse)
    elif ctype == "multipart/form-data":
        parse = functools.partial(multipart_payload, ctype_full, body, max_images)
        payload = parse() if small else await offload(parse)
    else:
        payload = Payload([body])
    if not payload.images:
        raise InvalidParameterError("the request holds no images")
    if len(payload.images) > max_images:
        raise too_many(len(payload.images), max_images)
    return payload
