"""wheelmeta (the CUDA-base check's PyPI reader) against a local server that answers like
PyPI, and unlike it: a short read and a 503 are retried; an ignored Range header, a 404
and a file that is not a wheel are clear errors; a cached answer needs no server."""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.deploy import wheelmeta

METADATA = "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\nRequires-Dist: dep>=2\n\n"


def _wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        # Incompressible padding first, so that the directory lies several blocks in.
        zf.writestr("demo/big.bin", bytes(range(256)) * 4096, zipfile.ZIP_STORED)
        zf.writestr("demo-1.0.dist-info/METADATA", METADATA)
    return buf.getvalue()


class _Pypi:
    def __init__(self) -> None:
        self.wheel = _wheel()
        self.files = {"/demo.whl": self.wheel, "/junk.whl": b"not a zip file " * 100}
        self.faults: list[str] = []  # consumed one per request: "503", "short", "no-range"
        self.requests = 0


@pytest.fixture
def pypi(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_Pypi, str]]:
    state = _Pypi()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.requests += 1
            fault = state.faults.pop(0) if state.faults else ""
            if fault == "503":
                self.send_error(503)
                return
            if self.path == "/simple/demo/":
                files = [{"filename": "demo-1.0-py3-none-any.whl", "url": "../../demo.whl",
                          "size": len(state.wheel)}]  # fmt: skip
                body = json.dumps({"files": files}).encode()
                self.send_response(200)
                if fault == "short":
                    body = body[: len(body) // 2]
            elif self.path in state.files:
                m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                data = state.files[self.path]
                if m is None or fault == "no-range":
                    body = data
                    self.send_response(200)
                else:
                    start, end = int(m.group(1)), int(m.group(2))
                    body = data[start : end + 1]
                    self.send_response(206)
                if fault == "short":  # a short answer, consistent with its header
                    body = body[: len(body) // 2]
            else:
                self.send_error(404)
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(wheelmeta, "SIMPLE", url + "/simple/{project}/")
    monkeypatch.setattr(wheelmeta, "BLOCK", 64 * 1024)
    monkeypatch.setattr(wheelmeta, "BACKOFF_S", 0.0)
    try:
        yield state, url
    finally:
        server.shutdown()
        server.server_close()


def test_reads_metadata_by_ranges_and_caches_it(pypi: tuple[_Pypi, str], tmp_path: Path) -> None:
    state, _ = pypi
    pattern = re.compile(r"demo-1\.0-py3-.*\.whl")
    meta = wheelmeta.pinned_wheel_metadata("demo", pattern, tmp_path / "demo.METADATA")
    assert meta.get_all("Requires-Dist") == ["dep>=2"]
    # The relative URL was resolved against the page; only part of the file was read.
    assert 1 < state.requests < len(state.wheel) // wheelmeta.BLOCK
    seen = state.requests
    again = wheelmeta.pinned_wheel_metadata("demo", pattern, tmp_path / "demo.METADATA")
    assert again.get_all("Requires-Dist") == ["dep>=2"] and state.requests == seen
    with pytest.raises(LookupError, match="no demo wheel"):
        wheelmeta.pinned_wheel_metadata("demo", re.compile(r"demo-2\.0-.*"), tmp_path / "2")


@pytest.mark.parametrize("faults", [["503"], ["short"], ["503", "short", "503"]])
def test_transient_failures_are_retried(pypi: tuple[_Pypi, str], faults: list[str]) -> None:
    state, url = pypi
    state.faults = list(faults)
    (wheel,) = wheelmeta.wheel_files("demo")
    assert wheel["url"] == url + "/demo.whl"
    assert state.requests == len(faults) + 1
    state.faults = list(faults)
    meta = wheelmeta.wheel_metadata(url + "/demo.whl", len(state.wheel))
    assert meta["Name"] == "demo" and not state.faults


def test_what_retrying_cannot_mend_is_a_clear_error(pypi: tuple[_Pypi, str]) -> None:
    state, url = pypi
    state.faults = ["no-range"]
    with pytest.raises(wheelmeta.WheelMetadataError, match="answered 200, not 206"):
        wheelmeta.wheel_metadata(url + "/demo.whl", len(state.wheel))
    with pytest.raises(wheelmeta.WheelMetadataError, match="HTTP 404"):
        wheelmeta.wheel_files("nope")
    state.faults = ["503"] * wheelmeta.ATTEMPTS
    with pytest.raises(wheelmeta.WheelMetadataError, match=f"failed {wheelmeta.ATTEMPTS} times"):
        wheelmeta.wheel_files("demo")
    with pytest.raises(wheelmeta.WheelMetadataError, match="METADATA"):
        wheelmeta.wheel_metadata(url + "/junk.whl", len(state.files["/junk.whl"]))
