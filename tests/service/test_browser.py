"""The docs and the demo page in a real browser (headless Chromium, offline), against a
real server with API keys, reached directly and through a path-prefix proxy. What is
asserted is what the browser rendered, compared with what the API answers."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
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
def site(r20_repository: Path) -> Iterator[ThreadServer]:
    settings = Settings(repository=r20_repository, api_keys=[KEY])
    srv = ThreadServer(settings, wrap=lambda app: PathPrefix(app, PREFIX)).start()
    yield srv
    srv.stop()


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


def test_docs_render_the_operations_and_try_it_out_classifies(
    chrome, site: ThreadServer, photos: list[Path], shots: Path
) -> None:
    requested_urls(chrome)  # what earlier tests left in the log
    chrome.get(site.url + "/docs")
    wait(chrome, lambda d: len(texts(d, ".opblock-summary-path")) >= 4)
    spec = httpx.get(site.url + "/openapi.json").json()
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
    assert answer["results"][0]["predictions"] == api_top5(site.url, photos[0])
    chrome.save_screenshot(str(shots / "docs-try-it-out.png"))
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


@pytest.mark.parametrize("where", ["", PREFIX])
def test_demo_page_classifies_real_photos(
    chrome, site: ThreadServer, photos: list[Path], shots: Path, where: str
) -> None:
    """The demo page, at the root and behind the prefix: the key typed in, two photos
    chosen; their top-5, latency split and cosine similarity rendered as the API says."""
    requested_urls(chrome)
    chrome.get(f"{site.url}{where}/ui")
    chrome.execute_script("window.sessionStorage.clear()")
    chrome.get(f"{site.url}{where}/ui")
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
        expected = api_top5(site.url, photo)
        assert labels == [p["label"] for p in expected]
        assert scores == [f"{100 * p['score']:.1f}%" for p in expected]
        timing = card.find_element(By.CSS_SELECTOR, ".timing").text
        for stage in ("preprocess", "queue", "inference", "round trip"):
            assert f"{stage} " in timing and f"{stage} -" not in timing, timing
    # The photo of a cat is a cat to the CIFAR-10 model (measured: 100.0%).
    first = chrome.find_element(By.CSS_SELECTOR, ".card .prediction .label").text
    assert first == "cat"

    r = httpx.post(f"{site.url}/v1/models/{MODEL}/embed", headers=AUTH, timeout=60,
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


def test_demo_page_takes_a_pasted_image(chrome, site: ThreadServer, photos: list[Path]) -> None:
    """A paste event carrying an image file (what Ctrl+V with a copied image gives)."""
    chrome.get(f"{site.url}/ui")
    chrome.execute_script(f"window.sessionStorage.setItem('resnet-serve-api-key', '{KEY}')")
    chrome.get(f"{site.url}/ui")
    wait(chrome, lambda d: Select(d.find_element(By.ID, "model")).options)
    png = io.BytesIO()
    Image.open(photos[0]).save(png, "PNG")
    chrome.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "image.png", {type: "image/png"}));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
        """,
        base64.b64encode(png.getvalue()).decode(),
    )
    wait(chrome, lambda d: d.find_elements(By.CSS_SELECTOR, ".card[data-state=done]"))
    assert chrome.find_element(By.CSS_SELECTOR, ".card .name").text == "pasted-1.png"
    labels = texts(chrome, ".card .prediction .label")
    png_path = photos[0].with_suffix(".pasted.png")
    png_path.write_bytes(png.getvalue())
    assert labels == [p["label"] for p in api_top5(site.url, png_path)]
