"""The docs pages, the demo page and their files over HTTP: open with API keys, local
files only, the bearer scheme in the schema, ``--no-ui``, and the Server-Timing split."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from resnet_serve.service.app import create_app
from resnet_serve.service.cli import settings_from_args
from resnet_serve.service.docs import static_dir
from resnet_serve.service.settings import Settings
from tests.service import tiny
from tests.service.servers import ThreadServer, thread_server

KEY = "docs-test-key"
PAGES = ("/", "/ui", "/docs", "/redoc", "/docs/oauth2-redirect")
# Our own scripts (the vendored bundles are checked in the browser: no request leaves).
OWN_SCRIPTS = ("docs.js", "redoc-init.js")


@pytest.fixture(scope="module")
def keyed(tiny_repository: Path) -> Iterator[ThreadServer]:
    srv = ThreadServer(
        Settings(repository=tiny_repository, api_keys=[KEY], cors_origins=["http://ui.test"])
    ).start()
    yield srv
    srv.stop()


def _local_refs(page: str, html: str) -> list[str]:
    """The paths a page's src= and href= point to, resolved as a browser would."""
    folder = page.rsplit("/", 1)[0] + "/"
    refs = []
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        if ref.startswith(("data:", "#")):
            continue
        path = folder + ref
        while "/../" in path:
            path = re.sub(r"/[^/]+/\.\./", "/", path, count=1)
        refs.append(path)
    return refs


def test_pages_and_their_files_need_no_key(keyed: ThreadServer) -> None:
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    for page in PAGES:
        r = httpx.get(keyed.url + page)
        assert r.status_code == 200, page
        assert r.headers["content-type"].startswith("text/html")
        for ref in _local_refs(page, r.text):
            if ref.endswith(("/docs", "/redoc")):  # the demo page's links
                continue
            got = httpx.get(keyed.url + ref)
            assert got.status_code == 200, (page, ref)
            assert got.headers["content-type"].split(";")[0] in (
                "text/javascript", "text/css", "image/png",
            ), ref  # fmt: skip


def test_no_page_references_an_external_url(keyed: ThreadServer) -> None:
    texts = {page: httpx.get(keyed.url + page).text for page in PAGES}
    texts |= {name: (static_dir() / name).read_text() for name in OWN_SCRIPTS}
    for name, text in texts.items():
        assert not re.search(r"(?i)(https?:)?//[a-z0-9-]+\.[a-z]", text), name
        assert not re.search(r"(?i)\b(src|href)=\"?//", text), name


def test_static_files_are_a_fixed_set_and_revalidated(keyed: ThreadServer) -> None:
    for name in ("nope.js", "..%2Fdocs.py", "%2e%2e", "docs.py"):
        r = httpx.get(f"{keyed.url}/static/{name}")
        assert r.status_code == 404, name
        assert r.json()["error"]["code"] == "not_found"
    first = httpx.get(keyed.url + "/static/swagger-ui.css")
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    again = httpx.get(
        keyed.url + "/static/swagger-ui.css", headers={"if-none-match": first.headers["etag"]}
    )
    assert again.status_code == 304 and not again.content


def test_the_schema_declares_the_bearer_scheme_where_keys_are_needed() -> None:
    def security(settings: Settings) -> dict[str, object]:
        spec = create_app(settings).openapi()
        return {
            path: op.get("security") for path, ops in spec["paths"].items() for op in ops.values()
        } | {"schemes": spec.get("components", {}).get("securitySchemes", {}).get("bearer")}

    plain = security(Settings())
    assert plain["schemes"] is None and not any(plain.values())
    keyed = security(Settings(api_keys=["k"]))
    assert keyed["schemes"] == {"type": "http", "scheme": "bearer",
                                "description": "one of the keys given with --api-keys"}  # fmt: skip
    assert keyed["/v1/models/{model}/classify"] == [{"bearer": []}]
    assert keyed["/v2/models/{model}"] == [{"bearer": []}]
    assert keyed["/healthz"] is None and keyed["/metrics"] is None
    assert security(Settings(api_keys=["k"], metrics_require_key=True))["/metrics"]


def test_no_ui_turns_the_demo_page_off(tiny_repository: Path) -> None:
    assert settings_from_args(["--no-ui"]).ui is False
    assert settings_from_args([]).ui is True
    with thread_server(tiny_repository, ui=False) as srv:
        assert httpx.get(srv.url + "/").status_code == 404
        assert httpx.get(srv.url + "/ui").status_code == 404
        assert httpx.get(srv.url + "/docs").status_code == 200


def _stages(header: str) -> dict[str, float]:
    return {name: float(ms) for name, ms in re.findall(r"(\w+);dur=([0-9.]+)", header)}


def test_server_timing_splits_each_inference_request(keyed: ThreadServer, tiny_pngs) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Origin": "http://ui.test"}
    files = [("file", (f"{i}.png", tiny_pngs[i])) for i in range(3)]
    for action in ("classify", "embed"):
        start = time.perf_counter()
        r = httpx.post(f"{keyed.url}/v1/models/{tiny.NAME}/{action}", files=files,
                       headers=auth)  # fmt: skip
        round_trip_ms = (time.perf_counter() - start) * 1000
        assert r.status_code == 200, r.text
        stages = _stages(r.headers["server-timing"])
        assert set(stages) == {"preprocess", "queue", "inference"}, r.headers["server-timing"]
        assert all(v >= 0 for v in stages.values()) and stages["inference"] > 0
        # Parts of the request's own time: together never more than the whole.
        assert sum(stages.values()) <= round_trip_ms
        # Readable by a page on another origin (CORS), as the demo page reads it.
        assert "server-timing" in r.headers["access-control-expose-headers"].lower()
    # No inference, no timing.
    assert "server-timing" not in httpx.get(keyed.url + "/healthz").headers
    bad = httpx.post(f"{keyed.url}/v1/models/{tiny.NAME}/classify", headers=auth,
                     files=[("file", ("x.png", b"not an image"))])  # fmt: skip
    assert bad.status_code == 400
