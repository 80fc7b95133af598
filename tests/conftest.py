"""Fixtures shared by the whole suite: the shared data beside the checkout, and model
repositories exported once per session."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESNET_SERVE_SHARED", ROOT.parent / "shared"))
WEIGHTS_HOME = SHARED / "weights"
CIFAR_TEST = SHARED / "data" / "cifar10-test-846.npz"
CIFAR_TRAIN = SHARED / "data" / "cifar10-train-932.npz"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the suite needs ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def cifar_test() -> dict[str, np.ndarray]:
    with np.load(_require(CIFAR_TEST)) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture
def torch_home(monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch.hub's cache pointed at the shared, offline copy of the CIFAR checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(_require(WEIGHTS_HOME)))
    return WEIGHTS_HOME


@pytest.fixture(scope="session")
def cifar_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with resnet20_cifar10 and resnet56_cifar10, real weights."""
    pytest.importorskip("torch")
    from models.catalog import get_variant
    from models.export import export_variant
    from models.weights import resolve

    repo = tmp_path_factory.mktemp("repository")
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(_require(WEIGHTS_HOME))
    try:
        for name in ("resnet20_cifar10", "resnet56_cifar10"):
            variant = get_variant(name)
            export_variant(variant, resolve(variant, "default"), repo)
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old
    return repo


@pytest.fixture(scope="session")
def timm() -> ModuleType:
    """timm's own code (tools/timm_source.py), its wheel fetched once into .cache/."""
    pytest.importorskip("torch")
    from tools.timm_source import Unavailable, load_timm

    try:
        return load_timm()
    except Unavailable as exc:
        pytest.skip(str(exc))
