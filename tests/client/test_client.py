"""The Python client against a real server (uvicorn on 127.0.0.1): every input kind, numpy
embeddings, typed errors, Retry-After retries (bounded), timeouts, and the async twin."""

from __future__ import annotations

import asyncio
import builtins
import email.utils
import io
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from resnet_serve.client import AsyncClient, Client, Prediction, errors
from resnet_serve.client.protocol import retry_after_s
from resnet_serve.service import errors as service_errors
from resnet_serve.service.settings import Settings
from tests.conftest import ROOT
from tests.service.servers import (
    ThreadServer,
    busy_server,
    free_port,
    metric_value,
    png,
    wait_until,
)

KEY = "client-test-key"
MODEL = "resnet20_cifar10"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def r20(cifar_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("client-r20")
    (repo / MODEL).symlink_to(cifar_repository / MODEL)
    return repo


@pytest.fixture(scope="module")
def cifar_pngs(cifar_test: dict[str, np.ndarray]) -> list[bytes]:
    return [png(img) for img in cifar_test["images"][:3]]


@pytest.fixture(scope="module")
def srv(r20: Path) -> Iterator[ThreadServer]:
    server = ThreadServer(Settings(repository=r20, api_keys=[KEY])).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photograph (scikit-image's sample of a cat), as a JPEG file."""
    data = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("photos") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=90)
    return path


def raw(srv: ThreadServer, action: str, files: list, **params: str) -> dict:
    parts = [("file", (f"{i}", f)) for i, f in enumerate(files)]
    url = f"{srv.url}/v1/models/{MODEL}/{action}"
    r = httpx.post(url, params=params, headers=AUTH, files=parts, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_classify_takes_paths_bytes_pil_images_and_arrays(
    srv: ThreadServer, cat: Path, cifar_pngs: list[bytes]
) -> None:
    array = np.asarray(Image.open(io.BytesIO(cifar_pngs[0])))
    expected_cat = [Prediction(**p) for p in raw(srv, "classify", [cat.read_bytes()])
                    ["results"][0]["predictions"]]  # fmt: skip
    expected_png = [Prediction(**p) for p in raw(srv, "classify", [cifar_pngs[0]])
                    ["results"][0]["predictions"]]  # fmt: skip
    with Client(srv.url, api_key=KEY) as c:
        assert c.classify(cat) == expected_cat  # one image: its top-5
        assert c.classify(str(cat), model=MODEL) == expected_cat
        assert c.classify(cat.read_bytes()) == expected_cat
        assert c.classify([cifar_pngs[0], array, Image.fromarray(array)]) == [expected_png] * 3
        assert c.classify(array[None]) == [expected_png]  # [N, H, W, C]: a batch
        assert len(c.classify(cat, top_k=2)) == 2
        assert expected_cat[0].label == "cat"
        listing = c.models()
    assert listing["default"] == MODEL


def test_embed_gives_numpy_arrays(srv: ThreadServer, cat: Path, cifar_pngs: list[bytes]) -> None:
    images = [cat.read_bytes(), cifar_pngs[1]]
    expected = np.asarray(raw(srv, "embed", images)["embeddings"], dtype=np.float32)
    with Client(srv.url, api_key=KEY) as c:
        vectors = c.embed(images)
        one = c.embed(images[0])
        logits = c.embed(images, layer="logits", pool="none")
        raw_vectors = c.embed(images, normalize=False)
        top1 = [r[0].index for r in c.classify(images)]
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape
    np.testing.assert_array_equal(vectors, expected)  # float32 on the wire: exact
    np.testing.assert_array_equal(one, expected[0])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw_vectors, axis=1), 1)
    assert logits.shape == (2, 10) and list(logits.argmax(axis=1)) == top1


def test_errors_are_typed(srv: ThreadServer, cat: Path) -> None:
    with Client(srv.url, api_key=KEY) as c:
        with pytest.raises(errors.ModelNotFoundError) as caught:
            c.classify(cat, model="no-such-model")
        assert caught.value.status == 404 and MODEL in caught.value.message
        assert caught.value.request_id
        with pytest.raises(errors.InvalidImageError, match="image 1"):
            c.classify([cat, b"not an image"])
        with pytest.raises(errors.InvalidParameterError):
            c.classify(cat, top_k=0)
        with pytest.raises(errors.InvalidParameterError):
            c.embed(cat, pool="gem")  # pool applies to a stage
        with pytest.raises(TypeError):
            c.classify(np.zeros((4, 4), dtype=np.float32))
    for key in (None, "wrong"):
        with Client(srv.url, api_key=key) as c, pytest.raises(errors.UnauthorizedError):
            c.models()
    with Client(f"http://127.0.0.1:{free_port()}") as c, pytest.raises(errors.ConnectError):
        c.models()


def test_pil_images_of_any_mode_and_orientation_as_their_files(
    srv: ThreadServer, cat: Path, tmp_path: Path
) -> None:
    # Was: CMYK, I, F (and YCbCr, LAB, HSV) images raised OSError while saved as PNG, and
    # an image opened from a rotated JPEG was sent as stored, not as the service makes its
    # file: upright by its EXIF orientation.
    photo = Image.open(cat)
    for mode in ("CMYK", "I", "F", "YCbCr", "LAB"):
        converted = photo.convert(mode) if mode != "LAB" else photo.convert("RGB")
        if mode == "LAB":
            from PIL import ImageCms

            rgb2lab = ImageCms.buildTransformFromOpenProfiles(
                ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
            )
            converted = ImageCms.applyTransform(photo, rgb2lab)
        with Client(srv.url, api_key=KEY) as c:
            assert len(c.classify(converted)) == 5, mode
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    photo.save(rotated, quality=95, exif=exif)
    # Its pixels upright, as an array (sent as they are): what the opened image must give.
    upright = np.asarray(Image.open(rotated).transpose(Image.Transpose.ROTATE_270))
    with Client(srv.url, api_key=KEY) as c:
        from_image = c.embed(Image.open(rotated), layer="logits", pool="none")
        expected = c.embed(upright, layer="logits", pool="none")
        stored = c.embed(np.asarray(Image.open(rotated)), layer="logits", pool="none")
    np.testing.assert_array_equal(from_image, expected)
    assert not np.allclose(stored, expected, atol=1e-3)  # the orientation matters here


def test_answers_not_of_the_service_and_odd_settings() -> None:
    # A proxy's error body, a dot-only model name, timeouts without a header to send.
    from resnet_serve.client import protocol

    for body in (b'["x"]', b'"bad gateway"', b"null", b'{"error": {"code": null}}'):
        response = httpx.Response(502, content=body, request=httpx.Request("GET", "http://x"))
        error = protocol.error_of(response)
        assert isinstance(error, errors.ServeError) and error.status == 502
        assert error.message == "Bad Gateway"
    assert protocol.model_path("..", "classify") == "/v1/models/%2E%2E/classify"
    assert protocol.model_path("a.b", "embed") == "/v1/models/a%2Eb/embed"
    assert "X-Request-Timeout-Ms" not in protocol.Policy(timeout_s=None).headers(None)
    assert "X-Request-Timeout-Ms" not in protocol.Policy(timeout_s=float("inf")).headers(None)
    assert protocol.Policy(timeout_s=0.0001).headers(None)["X-Request-Timeout-Ms"] == "1"


def test_every_error_code_of_the_service_has_its_class() -> None:
    # Was: it looked for a ``code`` on the service's classes, which keep their codes in
    # the error table, so it checked nothing (405 and 500 had no class).
    assert len(service_errors.TABLE) > 10
    for answer in service_errors.TABLE.values():
        mirror = errors.BY_CODE[answer.code]
        assert issubclass(mirror, errors.ServeError)
        assert mirror.code == answer.code and mirror.status == answer.http, answer
        assert errors.BY_STATUS[answer.http] is not None


def _rejected(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return metric_value(text, "resnet_serve_rejected_images_total", reason="queue_full")


def test_retry_after_is_honoured_and_bounded(r20: Path, cat: Path) -> None:
    image = cat.read_bytes()
    filled: list[httpx.Response] = []
    with busy_server(r20, image, max_queue_images=1) as (srv, _):
        # One image queued behind the held one fills the queue: the next are refused (503).
        filler = threading.Thread(
            target=lambda: filled.append(
                httpx.post(srv.url + "/v1/classify", content=image, timeout=120,
                           headers={"content-type": "image/jpeg"})
            )
        )  # fmt: skip
        filler.start()
        queued = lambda: metric_value(httpx.get(srv.url + "/metrics").text,  # noqa: E731
                                      "resnet_serve_queue_depth") == 1  # fmt: skip
        wait_until(queued, timeout=60)
        # Overloaded throughout: 1 + retries attempts, then the typed error.
        before = _rejected(srv.url)
        c = Client(srv.url, retries=2, max_retry_wait_s=0.05)
        with c, pytest.raises(errors.OverloadedError) as caught:
            c.classify(image)
        assert caught.value.status == 503
        assert _rejected(srv.url) - before == 3
        # Overloaded at first, then free: a retry gets the answer.
        got: list = []
        c = Client(srv.url, retries=1000, max_retry_wait_s=0.05)
        worker = threading.Thread(target=lambda: got.append(c.classify(image)))
        before = _rejected(srv.url)
        worker.start()
        wait_until(lambda: _rejected(srv.url) > before, timeout=30)
        assert srv.gate is not None
        srv.gate.set()
        worker.join(60)
        c.close()
        filler.join(60)
        assert got and got[0][0].label == "cat"
        assert [a.status_code for a in filled] == [200]


def test_client_timeout(r20: Path, cat: Path) -> None:
    image = cat.read_bytes()
    # The session is held (for minutes, unless released): nothing is answered in time.
    with busy_server(r20, image) as (srv, _):
        c = Client(srv.url, timeout_s=0.3, retries=0)
        with c, pytest.raises(errors.RequestTimeoutError) as caught:
            c.classify(image)
        assert isinstance(caught.value, builtins.TimeoutError)


def test_retry_after_forms() -> None:
    def answer(status: int, value: str | None) -> httpx.Response:
        return httpx.Response(status, headers={"retry-after": value} if value else {})

    assert retry_after_s(answer(503, "2")) == 2.0
    assert retry_after_s(answer(503, None)) is None
    assert retry_after_s(answer(500, "2")) is None  # only 503 invites a retry
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 20 < (retry_after_s(answer(503, later)) or 0) <= 30
    assert retry_after_s(answer(503, "soon")) is None


def test_async_client(srv: ThreadServer, cat: Path, cifar_pngs: list[bytes]) -> None:
    images = [cat.read_bytes(), cifar_pngs[2]]

    async def main() -> tuple:
        async with AsyncClient(srv.url, api_key=KEY) as c:
            # Concurrent calls share the client's connection pool.
            top, vectors = await asyncio.gather(c.classify(images), c.embed(images))
            with pytest.raises(errors.ModelNotFoundError):
                await c.classify(images, model="nope")
            return top, vectors, await c.models()

    top, vectors, listing = asyncio.run(main())
    with Client(srv.url, api_key=KEY) as c:
        assert top == c.classify(images)
        np.testing.assert_array_equal(vectors, c.embed(images))
    assert listing["default"] == MODEL


def test_the_readme_example_runs(
    srv: ThreadServer, cat: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The README's client example, as written, against the live server (its URL and key
    put in), with its two files made."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Python client") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    code = code.replace('"http://127.0.0.1:8000", api_key=None', f'"{srv.url}", api_key="{KEY}"')
    assert srv.url in code
    monkeypatch.chdir(tmp_path)
    shutil.copy(cat, "cat.jpg")
    Image.open(cat).rotate(90).save("dog.png")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.split("\n")
    assert out[0] == MODEL
    assert out[2].startswith("404 model_not_found")
