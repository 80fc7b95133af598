"""The inference routes' direct path (service/direct.py): what a client sees is what FastAPI's
full stack gives, for answers and errors alike, with keys and CORS on; and only those routes
take it."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from resnet_serve.service.direct import DirectPath
from resnet_serve.service.errors import ModelNotFoundError
from tests.service.servers import ThreadServer, metric_value, thread_server

KEY = "k-direct"
AUTH = {"authorization": f"Bearer {KEY}"}
ORIGIN = "http://page.example"
# Differ from request to request, or name the process: not part of the comparison.
VARYING = {"x-request-id", "server-timing", "date", "content-length"}


@pytest.fixture(scope="module")
def server(tiny_repository: Path) -> Iterator[ThreadServer]:
    with thread_server(
        tiny_repository, api_keys=[KEY], cors_origins=[ORIGIN], max_body_bytes=20_000,
        max_images_per_request=3,
    ) as srv:  # fmt: skip
        yield srv


def _requests(png: bytes) -> list[tuple[str, str, dict[str, object]]]:
    """(method, path, httpx keyword arguments): successes and every kind of error."""
    b64 = base64.b64encode(png).decode()
    png_h = {**AUTH, "content-type": "image/png", "origin": ORIGIN}
    return [
        ("POST", "/v1/models/tiny/classify", {"content": png, "headers": png_h}),
        ("POST", "/v1/classify?top_k=2", {"content": png, "headers": png_h}),
        ("POST", "/v1/classify", {"json": {"images": [b64], "top_k": 3}, "headers": AUTH}),
        ("POST", "/v1/embed?encoding=base64", {"files": {"file": ("a.png", png)}, "headers": AUTH}),
        ("POST", "/v1/classify?top_k=0", {"content": png, "headers": png_h}),
        ("POST", "/v1/models/nope/embed", {"content": png, "headers": png_h}),
        ("POST", "/v1/classify", {"content": b"not an image", "headers": png_h}),
        ("POST", "/v1/classify", {"content": b"\0" * 30_000, "headers": png_h}),
        ("POST", "/v1/classify", {"content": png, "headers": {"content-type": "image/png"}}),
        ("POST", "/v1/classify", {"content": png, "headers": {**AUTH, "content-type": "x/y"}}),
        ("POST", "/v2/models/tiny/infer", {"content": b"{", "headers": AUTH}),
        ("POST", "/v2/models/tiny/versions/1/infer", {"json": {"inputs": []}, "headers": AUTH}),
        ("POST", "/v2/models/tiny/versions/9/infer", {"json": {"inputs": []}, "headers": AUTH}),
        ("GET", "/v1/classify", {"headers": AUTH}),
        ("OPTIONS", "/v1/classify", {"headers": {"origin": ORIGIN,
                                                 "access-control-request-method": "POST"}}),
    ]  # fmt: skip


def _answers(srv: ThreadServer, png: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for method, path, kwargs in _requests(png):
            r = c.request(method, path, **kwargs)  # type: ignore[arg-type]
            headers = {k: v for k, v in r.headers.items() if k not in VARYING}
            assert r.headers.get("x-request-id"), (path, "every answer carries its ID")
            out.append((r.status_code, headers, r.content))
    return out


def test_the_direct_path_answers_as_fastapi_does(
    server: ThreadServer, tiny_pngs, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[str] = []
    match = DirectPath.match

    def spy(self: DirectPath, scope: dict[str, object]) -> object:
        child = match(self, scope)
        if child is not None:
            taken.append(str(scope["path"]))
        return child

    monkeypatch.setattr(DirectPath, "match", spy)
    fast = _answers(server, tiny_pngs[0])
    # Only the inference routes' POSTs, whatever their outcome.
    posts = [p.split("?")[0] for m, p, _ in _requests(tiny_pngs[0]) if m == "POST"]
    assert taken == posts
    monkeypatch.setattr(DirectPath, "match", lambda self, scope: None)
    full = _answers(server, tiny_pngs[0])
    assert [a[0] for a in fast] == [200, 200, 200, 200, 422, 404, 400, 413, 401, 415, 400, 400,
                                    404, 405, 200]  # fmt: skip
    for path, got, want in zip(_requests(tiny_pngs[0]), fast, full, strict=True):
        assert got == want, path[1]


def test_the_direct_path_counts_and_times_its_requests(server: ThreadServer, tiny_pngs) -> None:
    def count() -> float:
        text = httpx.get(server.url + "/metrics").text
        return metric_value(text, "resnet_serve_requests_total", endpoint="classify",
                            model="tiny", status="200")  # fmt: skip

    before = count()
    r = httpx.post(server.url + "/v1/models/tiny/classify", content=tiny_pngs[0],
                   headers={**AUTH, "content-type": "image/png"})  # fmt: skip
    assert r.status_code == 200
    assert {s.split(";")[0] for s in r.headers["server-timing"].split(", ")} == {
        "preprocess", "queue", "inference"}  # fmt: skip
    assert count() - before == 1


def test_an_unexpected_error_on_the_direct_path_is_a_logged_500(
    tiny_repository: Path, tiny_pngs, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    async def broken(scope, receive, send):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    monkeypatch.setattr(DirectPath, "_handle", staticmethod(broken))
    with thread_server(tiny_repository) as srv:
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[0],
                       headers={"content-type": "image/png"})  # fmt: skip
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
        assert r.headers["x-request-id"]
        assert httpx.get(srv.url + "/healthz").status_code == 200
    assert any("a bug" in (rec.exc_text or "") for rec in caplog.records)


def test_with_fastapis_opentelemetry_on_every_request_takes_its_path(
    tiny_repository: Path, tiny_pngs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI switches its telemetry on once a provider is configured; its spans must then
    cover the inference routes too."""
    from fastapi.telemetry._asgi import NativeTelemetry

    traced: list[str] = []
    call = NativeTelemetry.__call__

    async def spy(self: NativeTelemetry, *, scope: dict[str, object], **kwargs: object) -> None:
        traced.append(str(scope["path"]))
        await call(self, scope=scope, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(NativeTelemetry, "enabled", lambda self: True)
    monkeypatch.setattr(NativeTelemetry, "__call__", spy)
    monkeypatch.setattr(DirectPath, "match", lambda self, scope: pytest.fail("direct path"))
    with thread_server(tiny_repository) as srv:
        r = httpx.post(srv.url + "/v1/classify", content=tiny_pngs[0],
                       headers={"content-type": "image/png"})  # fmt: skip
        assert r.status_code == 200 and r.headers["x-request-id"]
    assert "/v1/classify" in traced


def test_middleware_cannot_be_added_once_the_direct_path_is_built(tiny_pngs) -> None:
    """Built with Starlette's stack on the first call, whatever that call is: middleware
    added later would be missing from the direct path, so it is refused, as Starlette does."""
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.testclient import TestClient

    from resnet_serve.service.app import create_app
    from resnet_serve.service.settings import Settings

    def no_model(name: str | None) -> None:
        raise ModelNotFoundError(str(name), [])

    app = create_app(Settings())
    # No lifespan and no runtime: the first call is the request itself, answered by the
    # route (its model lookup fails) through the direct path.
    app.state.runtime = SimpleNamespace(engine=SimpleNamespace(model=no_model), models={})
    r = TestClient(app).post("/v1/models/m/classify", content=tiny_pngs[0],
                             headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 404 and r.headers["x-request-id"]
    with pytest.raises(RuntimeError):
        app.add_middleware(GZipMiddleware)


def test_routes_without_path_parameters_are_found_by_their_path_alone() -> None:
    """The static inference paths by dict, the others (and any request under a root path)
    by the routes' own matching: the same route and parameters either way."""
    from resnet_serve.service.app import create_app
    from resnet_serve.service.settings import Settings

    app = create_app(Settings())
    direct = DirectPath(app)
    assert set(direct.static) == {"/v1/classify", "/v1/embed"}

    def scope(path: str, root_path: str = "") -> dict[str, object]:
        return {"type": "http", "method": "POST", "path": path, "root_path": root_path}

    static = direct.match(scope("/v1/classify"))
    assert static is not None and static["route"].path == "/v1/classify"
    assert static["path_params"] == {} and static["endpoint"] is static["route"].endpoint
    # The same answer from the routes' own matching, as under a root path.
    assert direct.match(scope("/api/v1/classify", "/api")) == static
    named = direct.match(scope("/v2/models/tiny/infer"))
    assert named is not None and named["path_params"] == {"model": "tiny"}
    assert direct.match({**scope("/v1/classify"), "method": "GET"}) is None
    assert direct.match(scope("/v1/unknown")) is None


def test_fastapis_telemetry_switched_on_later_is_seen_within_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asked at most once a second (a dozen Python calls a request otherwise): a provider
    configured after the first request still turns the inference routes over to FastAPI's
    path, within TRACED_RECHECK_S."""
    from fastapi.telemetry._asgi import NativeTelemetry

    from resnet_serve.service import direct as direct_module
    from resnet_serve.service.app import create_app
    from resnet_serve.service.settings import Settings

    on = {"now": False}
    asked: list[bool] = []

    def enabled(self: NativeTelemetry) -> bool:
        asked.append(on["now"])
        return on["now"]

    monkeypatch.setattr(NativeTelemetry, "enabled", enabled)
    clock = {"now": 100.0}
    monkeypatch.setattr(direct_module.time, "monotonic", lambda: clock["now"])
    app = create_app(Settings())
    if getattr(app, "_native_telemetry", None) is None:
        pytest.skip("this FastAPI has no native telemetry")
    assert app._traced() is False
    on["now"] = True
    clock["now"] += direct_module.TRACED_RECHECK_S / 2
    assert app._traced() is False and len(asked) == 1  # not asked again yet
    clock["now"] += direct_module.TRACED_RECHECK_S
    assert app._traced() is True and len(asked) == 2
