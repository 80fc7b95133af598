"""The vendored swagger-ui and Redoc files: exactly the pinned npm releases (with the one
documented patch), each with its licence, and all of them in the wheel."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from tests.conftest import cached
from tools.docs_assets import PINS, STATIC, FetchError, fetch_all


def _fetch(tmp: Path) -> None:
    try:
        files = fetch_all(tmp)
    except FetchError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"fetching the pinned docs assets: {exc}")
        pytest.skip(f"fetching the pinned docs assets: {exc}")
    for tarball in tmp.glob("*.tgz"):
        tarball.unlink()
    for name, data in files.items():
        (tmp / name).write_bytes(data)


def test_vendored_files_are_the_pinned_releases() -> None:
    key = "-".join(f"{p.package}-{p.version}" for p in PINS)
    fetched = cached(f"docs-assets-{key}", _fetch)
    names = [name for pin in PINS for name in pin.files.values()]
    for name in names:
        assert (STATIC / name).read_bytes() == (fetched / name).read_bytes(), (
            f"{name} differs from its pinned release: run python tools/docs_assets.py --write"
        )


def test_each_vendored_package_ships_its_licence() -> None:
    for pin in PINS:
        licences = [n for n in pin.files.values() if "LICENSE" in n]
        assert any(n.endswith(".LICENSE") for n in licences), pin.package
        for bundle in (n for n in pin.files.values() if n.endswith(".js")):
            header = (STATIC / bundle).read_bytes()[:200]
            if b"license information please see" in header:
                assert f"{bundle}.LICENSE.txt" in licences, bundle


def test_the_wheel_holds_the_pages_the_assets_and_their_licences(built_wheel: Path) -> None:
    wheel = built_wheel
    inside = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"resnet_serve/service/static/{p.name}" for p in STATIC.iterdir() if p.is_file()}
    assert shipped <= inside, shipped - inside
    for needed in ("ui.html", "docs.html", "redoc.html", "swagger-ui-dist.LICENSE",
                   "redoc.LICENSE", "swagger-ui-bundle.js.LICENSE.txt"):  # fmt: skip
        assert f"resnet_serve/service/static/{needed}" in inside
    assert "resnet_serve/client/__init__.py" in inside
