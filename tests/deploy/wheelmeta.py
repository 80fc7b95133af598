"""A wheel's METADATA from PyPI without downloading the wheel: the file list from the
simple API (PEP 691 JSON), then HTTP range requests for the zip directory and the one
member. onnxruntime-gpu's wheel is ~250 MB; this reads a few hundred KB of it.

Transient network errors (timeouts, resets, 429 and 5xx answers, short reads) are retried;
what still fails is raised as ``WheelMetadataError`` (an ``OSError``) that says what was
asked. ``pinned_wheel_metadata`` keeps what it read in a cache file: a released wheel's
file never changes, so a run with the cache filled needs no network for it."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path
from typing import TypeVar

SIMPLE = "https://pypi.org/simple/{project}/"
BLOCK = 256 * 1024
TIMEOUT_S = 60
ATTEMPTS = 4
BACKOFF_S = 2.0

T = TypeVar("T")


class WheelMetadataError(OSError):
    """PyPI could not be read, or answered something other than what was asked for."""


class _Retry(Exception):
    """An answer worth asking again for."""


def _with_retries(what: str, fn: Callable[[], T]) -> T:
    last: BaseException | None = None
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            return fn()
        except WheelMetadataError:
            raise
        except urllib.error.HTTPError as exc:
            if exc.code != 429 and exc.code < 500:
                raise WheelMetadataError(f"{what}: HTTP {exc.code} {exc.reason}") from exc
            last = exc
        except (_Retry, OSError, http.client.HTTPException) as exc:
            last = exc  # URLError, timeouts, resets, IncompleteRead, RemoteDisconnected
    raise WheelMetadataError(f"{what}: failed {ATTEMPTS} times, last: {last!r}") from last


def _get(url: str, headers: dict[str, str], expect_status: int, check: Callable[[bytes], T]) -> T:
    """GET ``url``; ``check`` turns the body into the answer or raises ValueError for one
    worth asking again for (a short read, a truncated page)."""

    def attempt() -> T:
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            if resp.status != expect_status:
                # e.g. 200 for a range request: a server or proxy that ignores Range would
                # send the whole file; do not read it.
                raise WheelMetadataError(f"{url}: answered {resp.status}, not {expect_status}")
            data = resp.read()
        try:
            return check(data)
        except ValueError as exc:
            raise _Retry(f"{url}: {exc}") from exc

    return _with_retries(f"GET {url} {headers.get('Range', '')}".strip(), attempt)


def _length(n: int) -> Callable[[bytes], bytes]:
    def check(data: bytes) -> bytes:
        if len(data) != n:
            raise ValueError(f"{len(data)} bytes, not {n}")
        return data

    return check


class HTTPRangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file, fetched in cached blocks."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self.size = size
        self.pos = 0
        self.blocks: dict[int, bytes] = {}
        # zipfile turns any OSError while reading into BadZipFile: kept to re-raise.
        self.error: WheelMetadataError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _block(self, index: int) -> bytes:
        if index not in self.blocks:
            start = index * BLOCK
            end = min(self.size, start + BLOCK) - 1
            headers = {"Range": f"bytes={start}-{end}"}
            try:
                self.blocks[index] = _get(self.url, headers, 206, _length(end - start + 1))
            except WheelMetadataError as exc:
                self.error = exc
                raise
        return self.blocks[index]

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self.size - self.pos))
        out = bytearray()
        while len(out) < n:
            index, offset = divmod(self.pos + len(out), BLOCK)
            chunk = self._block(index)[offset : offset + n - len(out)]
            if not chunk:  # never spin on a short block
                raise WheelMetadataError(f"{self.url}: block {index} is short")
            out += chunk
        buffer[:n] = out
        self.pos += n
        return n


def _project_page(data: bytes) -> list[dict[str, object]]:
    try:
        files = json.loads(data)["files"]  # ValueError for a truncated page
    except (KeyError, TypeError) as exc:
        raise ValueError(f"no file list: {exc!r}") from exc
    if not isinstance(files, list):
        raise ValueError("no file list")
    return files


def wheel_files(project: str) -> list[dict[str, object]]:
    url = SIMPLE.format(project=project)
    files = _get(url, {"Accept": "application/vnd.pypi.simple.v1+json"}, 200, _project_page)
    wheels = [dict(f) for f in files if str(f["filename"]).endswith(".whl")]
    for f in wheels:  # PEP 691 allows URLs relative to the page
        f["url"] = urllib.parse.urljoin(url, str(f["url"]))
    return wheels


def wheel_metadata(url: str, size: int) -> Message:
    return HeaderParser().parsestr(_read_metadata(url, size))


def _read_metadata(url: str, size: int) -> str:
    remote = HTTPRangeFile(url, size)
    try:
        with zipfile.ZipFile(io.BufferedReader(remote, BLOCK)) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            return zf.read(name).decode("utf-8")
    except (zipfile.BadZipFile, StopIteration, UnicodeDecodeError) as exc:
        if remote.error is not None:
            raise remote.error from exc
        raise WheelMetadataError(f"{url}: no readable .dist-info/METADATA: {exc!r}") from exc


def pinned_wheel_metadata(project: str, filename: re.Pattern[str], cache_file: Path) -> Message:
    """METADATA of ``project``'s wheel whose file name matches ``filename`` (a pinned
    version's: a released file never changes), from ``cache_file`` or else from PyPI, then
    kept there. Raises LookupError if PyPI lists no such wheel."""
    if cache_file.is_file():
        return HeaderParser().parsestr(cache_file.read_text(encoding="utf-8"))
    wheel = next((f for f in wheel_files(project) if filename.fullmatch(str(f["filename"]))), None)
    if wheel is None:
        raise LookupError(f"PyPI lists no {project} wheel matching {filename.pattern}")
    text = _read_metadata(str(wheel["url"]), int(wheel["size"]))  # type: ignore[call-overload]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, cache_file)  # atomic: a racing run writes the same text
    return HeaderParser().parsestr(text)
