"""Regressions from the hardening issue, over real HTTP: each was a 500, a hang or a
wrong answer."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service.servers import ThreadServer, thread_server


@pytest.fixture(scope="module")
def srv(r20_repository: Path) -> Iterator[ThreadServer]:
    with thread_server(r20_repository) as server:
        yield server


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def test_thin_images_are_refused_before_resizing(srv, cifar_pngs) -> None:
    # 1x100000 (a few hundred bytes) resized to a shorter side of 32 is 32x3200000: it was
    # a 200 after seconds and 500 MiB; 1x40000000 (at the pixel limit) a MemoryError, a 500.
    for width, height in ((100_000, 1), (1, 40_000_000)):
        files = [("file", ("ok.png", cifar_pngs[0])), ("file", ("thin.png", _png(width, height)))]
        r = httpx.post(srv.url + "/v1/classify", files=files, timeout=60)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "payload_too_large"
        assert error["message"].startswith("image 1: ") and "once resized" in error["message"]
    # Thin but within the limit once resized: still served.
    files = [("file", ("thin.png", _png(1000, 10)))]
    assert httpx.post(srv.url + "/v1/classify", files=files, timeout=60).status_code == 200
