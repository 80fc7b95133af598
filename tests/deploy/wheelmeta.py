"""A wheel's METADATA from PyPI without downloading the wheel: the file list from the
simple API (PEP 691 JSON), then HTTP range requests for the zip directory and the one
member. onnxruntime-gpu's wheel is ~250 MB; this reads a few hundred KB of it."""

from __future__ import annotations

import io
import json
import urllib.request
import zipfile
from email.message import Message
from email.parser import HeaderParser

SIMPLE = "https://pypi.org/simple/{project}/"
BLOCK = 256 * 1024
TIMEOUT_S = 60


class HTTPRangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file, fetched in cached blocks."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self.size = size
        self.pos = 0
        self.blocks: dict[int, bytes] = {}

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
            req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end}"})
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                if resp.status != 206:
                    raise OSError(f"{self.url}: range request answered {resp.status}")
                self.blocks[index] = resp.read()
        return self.blocks[index]

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.size - self.pos)
        out = bytearray()
        while len(out) < n:
            index, offset = divmod(self.pos + len(out), BLOCK)
            out += self._block(index)[offset : offset + n - len(out)]
        buffer[:n] = out
        self.pos += n
        return n


def wheel_files(project: str) -> list[dict[str, object]]:
    req = urllib.request.Request(
        SIMPLE.format(project=project),
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        return [f for f in json.load(resp)["files"] if str(f["filename"]).endswith(".whl")]


def wheel_metadata(url: str, size: int) -> Message:
    with zipfile.ZipFile(io.BufferedReader(HTTPRangeFile(url, size), BLOCK)) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return HeaderParser().parsestr(zf.read(name).decode("utf-8"))
