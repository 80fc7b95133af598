"""The docs and the demo page in a real browser (headless Chromium, offline), against a
real server with API keys, reached directly and through a path-prefix proxy. What is
asserted is what the browser rendered, compared with what the API answers."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.types import ASGIApp

from resnet_serve.service.settings import Settings
from tests.conftest import ROOT
from tests.service.browser import WAIT_S, PathPrefix, foreign, requested_urls, screenshots_dir
from tests.service.servers import ThreadServer

pytest.importorskip("selenium")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

KEY = "browser-test-key"
MODEL = "resnet20_cifar10"
PREFIX = "/prefix"
AUTH = {"Authorization": f"Bearer {KEY}"}
# RESNET_SERVE_DOCS_SCREENSHOTS=1: the demo page's screenshot also goes into docs/.
DOCS_IMAGES = ROOT / "docs" / "images"


@pytest.fixture(scope="module")
def proxy() -> list[PathPrefix]:
    return []


@pytest.fixture(scope="module")
def site(r20_repository: Path, proxy: list[PathPrefix]) -> Iterator[ThreadServer]:
    """The service with API keys, at its root and (as a proxy would serve it) under PREFIX."""

    def behind_prefix(app: ASGIApp) -> ASGIApp:
        proxy.append(PathPrefix(app, PREFIX))
        return proxy[0]

    settings = Settings(repository=r20_repository, api_keys=[KEY])
    srv = ThreadServer(settings, wrap=behind_prefix).start()
    yield srv
    srv.stop()


@pytest.fixture
def page_at(site: ThreadServer, proxy: list[PathPrefix], request) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The base URL of the pages for the test's ``where``: "" (the root) or PREFIX, where
    the test fails if a request of the page's bypassed the prefix."""
    where = getattr(request, "param", "")
    proxy[0].unprefixed.clear()
    yield site.url + where
    if where:
        assert proxy[0].unprefixed == [], "requests that left the prefix"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real photographs (scikit-image's samples): a cat, as a JPEG, and a coffee cup."""
    data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    cat, cup = folder / "chelsea.jpg", folder / "coffee.png"
    Image.fromarray(data.chelsea()).save(cat, quality=90)
    Image.fromarray(data.coffee()).save(cup)
    return [cat, cup]


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshots_dir(tmp_path_factory)


def wait(driver, what, timeout: float = WAIT_S):  # type: ignore[no-untyped-def]
    return WebDriverWait(driver, timeout).until(lambda d: what(d))


def texts(driver, css: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def api_top5(url: str, photo: Path) -> list[dict]:
    r = httpx.post(f"{url}/v1/models/{MODEL}/classify", headers=AUTH,
                   files={"file": (photo.name, photo.read_bytes())}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["predictions"]


@pytest.mark.parametrize("page_at", ["", PREFIX], indirect=True)
def test_docs_render_the_operations_and_try_it_out_classifies(
    chrome, site: ThreadServer, page_at: str, photos: list[Path], shots: Path
) -> None:
    chrome.get(page_at + "/docs")
    chrome.execute_script("window.localStorage.clear()")  # an authorization kept from before
    requested_urls(chrome)  # what earlier tests left in the log
    chrome.get(page_at + "/docs")
    wait(chrome, lambda d: len(texts(d, ".opblock-summary-path")) >= 4)
    spec = httpx.get(page_at + "/openapi.json").json()
    rendered = set(texts(chrome, ".opblock-summary-path"))
    assert rendered == set(spec["paths"]), rendered ^ set(spec["paths"])

    # Authorize with the key (the schema's bearer scheme gives the button).
    chrome.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
    dialog = wait(chrome, lambda d: d.find_element(By.CSS_SELECTOR, ".dialog-ux"))
    dialog.find_element(By.CSS_SELECTOR, "input").send_keys(KEY)
    dialog.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .authorize").click()
    wait(chrome, lambda d: d.find_elements(By.CSS_SELECTOR, ".auth-btn-wrapper .btn-done"))
    chrome.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .btn-done").click()

    # Try it out: classify one photo, sent as a raw image/* body.
    op = chrome.find_element(By.ID, "operations-inference-classify_v1_models__model__classify_post")
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait(chrome, lambda d: op.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    op.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    op.find_element(By.CSS_SELECTOR, "tr[data-param-name='model'] input").send_keys(MODEL)
    Select(op.find_element(By.CSS_SELECTOR, ".body-param-content-type select")).select_by_value(
        "image/*"
    )
    wait(chrome, lambda d: op.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    op.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(photos[0]))
    op.find_element(By.CSS_SELECTOR, ".execute").click()
    answered = ".live-responses-table tbody .response-col_status"
    status = wait(chrome, lambda d: op.find_elements(By.CSS_SELECTOR, answered))
    assert status[0].text.strip() == "200"
    body = op.find_element(By.CSS_SELECTOR, answered.replace("status", "description pre"))
    answer = json.loads(body.text)
    assert answer["model"] == MODEL
    assert answer["results"][0]["predictions"] == api_top5(page_at, photos[0])
    where = page_at[len(site.url) :].replace("/", "-")
    chrome.save_screenshot(str(shots / f"docs-try-it-out{where}.png"))
    assert foreign(requested_urls(chrome), site.url) == []


def test_redoc_renders_the_reference(chrome, site: ThreadServer, shots: Path) -> None:
    requested_urls(chrome)
    chrome.get(site.url + "/redoc")
    spec = httpx.get(site.url + "/openapi.json").json()
    summaries = {op["summary"] for ops in spec["paths"].values() for op in ops.values()}
    wait(chrome, lambda d: summaries <= set(texts(d, "h2")))
    chrome.save_screenshot(str(shots / "redoc.png"))
    assert foreign(requested_urls(chrome), site.url) == []


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("page_at", ["", PREFIX], indirect=True)
def test_demo_page_classifies_real_photos(
    chrome, site: ThreadServer, page_at: str, photos: list[Path], shots: Path
) -> None:
    """The demo page, at the root and behind the prefix: the key typed in, two photos
    chosen; their top-5, latency split and cosine similarity rendered as the API says."""
    where = page_at[len(site.url) :]
    requested_urls(chrome)
    chrome.get(f"{page_at}/ui")
    chrome.execute_script("window.sessionStorage.clear()")
    chrome.get(f"{page_at}/ui")
    # Without the key: the page says what is needed.
    wait(chrome, lambda d: "API key" in d.find_element(By.ID, "message").text)
    chrome.find_element(By.ID, "key").send_keys(KEY + "\n")
    wait(chrome, lambda d: Select(d.find_element(By.ID, "model")).first_selected_option.text)
    assert Select(chrome.find_element(By.ID, "model")).first_selected_option.text == MODEL
    chrome.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in photos))
    wait(chrome, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-state=done]")) == 2)
    similarity = chrome.find_element(By.ID, "similarity")
    wait(chrome, lambda d: similarity.get_attribute("data-state") == "done")

    for card, photo in zip(chrome.find_elements(By.CSS_SELECTOR, ".card"), photos, strict=True):
        assert card.find_element(By.CSS_SELECTOR, ".name").text == photo.name
        assert not card.find_elements(By.CSS_SELECTOR, ".error")
        labels = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".prediction .label")]
        scores = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".prediction .score")]
        expected = api_top5(page_at, photo)
        assert labels == [p["label"] for p in expected]
        assert scores == [f"{100 * p['score']:.1f}%" for p in expected]
        timing = card.find_element(By.CSS_SELECTOR, ".timing").text
        for stage in ("preprocess", "queue", "inference", "round trip"):
            assert f"{stage} " in timing and f"{stage} -" not in timing, timing
    # The photo of a cat is a cat to the CIFAR-10 model (measured: 100.0%).
    first = chrome.find_element(By.CSS_SELECTOR, ".card .prediction .label").text
    assert first == "cat"

    r = httpx.post(f"{page_at}/v1/models/{MODEL}/embed", headers=AUTH, timeout=60,
                   files=[("file", (p.name, p.read_bytes())) for p in photos])  # fmt: skip
    a, b = (np.asarray(e, dtype=np.float32) for e in r.json()["embeddings"])
    pair = chrome.find_element(By.ID, "similarity-pair").text
    assert pair.startswith(f"{photos[0].name} and {photos[1].name}: {_cosine(a, b):.3f}"), pair

    name = f"demo{where.replace('/', '-')}.png"
    chrome.save_screenshot(str(shots / name))
    if not where and os.environ.get("RESNET_SERVE_DOCS_SCREENSHOTS"):
        DOCS_IMAGES.mkdir(exist_ok=True)
        shutil.copyfile(shots / name, DOCS_IMAGES / "demo.png")
    assert foreign(requested_urls(chrome), site.url) == []


@pytest.mark.parametrize("event", ["paste", "drop"])
def test_demo_page_takes_a_pasted_or_dropped_image(
    chrome, site: ThreadServer, photos: list[Path], tmp_path: Path, event: str
) -> None:
    """A paste event carrying an image file (what Ctrl+V with a copied image gives), and a
    drop on the drop zone (what dragging a file from a file manager gives)."""
    chrome.get(f"{site.url}/ui")
    chrome.execute_script(f"window.sessionStorage.setItem('resnet-serve-api-key', '{KEY}')")
    chrome.get(f"{site.url}/ui")
    wait(chrome, lambda d: Select(d.find_element(By.ID, "model")).options)
    png = tmp_path / "image.png"
    Image.open(photos[0]).save(png, "PNG")
    chrome.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], arguments[2], {type: "image/png"}));
        if (arguments[1] === "paste") {
          document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
        } else {
          document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        }
        """,
        base64.b64encode(png.read_bytes()).decode(),
        event,
        "image.png" if event == "paste" else "dropped.png",
    )
    wait(chrome, lambda d: d.find_elements(By.CSS_SELECTOR, ".card[data-state=done]"))
    # A pasted image has no name of its own (browsers call it image.png): the page numbers it.
    name = "pasted-1.png" if event == "paste" else "dropped.png"
    assert chrome.find_element(By.CSS_SELECTOR, ".card .name").text == name
    labels = texts(chrome, ".card .prediction .label")
    assert labels == [p["label"] for p in api_top5(site.url, png)]
