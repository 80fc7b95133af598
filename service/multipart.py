"""A multipart/form-data body already read into memory, parsed in memory.

The body is whole and bounded (``--max-body-bytes``) before parsing starts, so parts are
copied out of it: nothing is spooled to a temporary file (Starlette's form parser writes
every part over 1 MB to ``TMPDIR``, where a full disk became a 400 blamed on the client),
and the parse is one synchronous call that the caller can run off the event loop. The
parser is python-multipart's, the one Starlette uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from resnet_serve.service.errors import BadRequestError, PayloadTooLargeError

FILE_FIELDS = ("file", "files", "image", "images")
MAX_FIELDS = 64  # form fields that are not files: a handful of parameters


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    disposition: dict[bytes, bytes] = field(default_factory=dict)  # its parameters


class _TooMany(Exception):
    pass


def parse_multipart(
    content_type: str, body: bytes, max_files: int
) -> tuple[list[bytes], dict[str, Any]]:
    """The images of the ``file`` (``files``, ``image``, ``images``) parts, in order, and
    the form fields. More than ``max_files`` files: 413, as a count just over the limit."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequestError("invalid multipart body: the content type names no boundary")
    parts: list[_Part] = []
    field_name = bytearray()
    field_value = bytearray()
    files = 0

    def part_begin() -> None:
        parts.append(_Part())

    def header_end() -> None:
        parts[-1].headers[bytes(field_name).lower()] = bytes(field_value)
        field_name.clear()
        field_value.clear()

    def headers_finished() -> None:
        nonlocal files
        part = parts[-1]
        _, part.disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"filename" in part.disposition:
            files += 1
            if files > max_files:
                raise _TooMany
        elif len(parts) - files > MAX_FIELDS:
            raise BadRequestError(f"invalid multipart body: more than {MAX_FIELDS} fields")

    try:  # python-multipart refuses a boundary over 256 bytes as it builds the parser
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": part_begin,
                "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
                "on_header_field": lambda data, start, end: field_name.extend(data[start:end]),
                "on_header_value": lambda data, start, end: field_value.extend(data[start:end]),
                "on_header_end": header_end,
                "on_headers_finished": headers_finished,
            },
        )
    except FormParserError as exc:
        raise BadRequestError(f"invalid multipart body: {exc}") from None
    try:
        parser.write(body)
        parser.finalize()
    except _TooMany:
        raise PayloadTooLargeError(
            f"more than {max_files} images in one request; the limit is {max_files}"
        ) from None
    except MultipartParseError as exc:
        raise BadRequestError(f"invalid multipart body: {exc}") from None
    if parser.state != MultipartState.END:
        raise BadRequestError("invalid multipart body: it ends before its closing boundary")
    images: list[bytes] = []
    params: dict[str, Any] = {}
    for part in parts:
        name = part.disposition.get(b"name", b"").decode("latin-1")
        if b"filename" in part.disposition:
            if name in FILE_FIELDS:
                images.append(bytes(part.data))
        else:
            try:
                params[name] = part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequestError(
                    f"invalid multipart body: field {name!r} is not UTF-8"
                ) from None
    return images, params
