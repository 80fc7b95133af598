from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# The headless Chromium of the browser tests (tests/service/test_browser.py).
from tests.service.browser import chrome  # noqa: F401
from tests.service.servers import ProcessServer, png


@pytest.fixture(scope="session")
def cifar_pngs(cifar_test: dict[str, np.ndarray]) -> list[bytes]:
    return [png(img) for img in cifar_test["images"]]


@pytest.fixture(scope="session")
def r20_repository(cifar_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding only resnet20_cifar10 (links to the exported files)."""
    repo = tmp_path_factory.mktemp("r20")
    (repo / "resnet20_cifar10").symlink_to(cifar_repository / "resnet20_cifar10")
    return repo


@pytest.fixture(scope="module")
def cifar_server(cifar_repository: Path) -> Iterator[ProcessServer]:
    """`resnet-serve` on both CIFAR models; resnet20_cifar10 is the default (listed first)."""
    srv = ProcessServer(cifar_repository, models="resnet20_cifar10,resnet56_cifar10").start()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the tiny onnx.helper model (tests/service/tiny.py): no torch, no
    ../shared, answers known in numpy."""
    from tests.service import tiny

    repo = tmp_path_factory.mktemp("tiny")
    tiny.export(repo)
    return repo


@pytest.fixture(scope="session")
def tiny_images() -> np.ndarray:
    """64 images of the tiny model's input size, uint8 ``[64, 8, 8, 3]``."""
    from tests.service import tiny

    return np.random.default_rng(3).integers(0, 256, (64, tiny.CROP, tiny.CROP, 3), np.uint8)


@pytest.fixture(scope="session")
def tiny_pngs(tiny_images: np.ndarray) -> list[bytes]:
    return [png(img) for img in tiny_images]


@pytest.fixture(scope="session")
def tiny_pair_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny models: ``tiny`` (the first by name) and ``tiny2``, the same graph."""
    from tests.service import tiny

    repo = tmp_path_factory.mktemp("tiny-pair")
    tiny.export(repo)
    tiny.export(repo, name="tiny2")
    return repo
