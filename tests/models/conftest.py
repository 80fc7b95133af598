"""Fixtures of the build step's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CIFAR_TRAIN, WEIGHTS_HOME

CIFAR_MODELS = ("resnet20_cifar10", "resnet56_cifar10")


@pytest.fixture(scope="session")
def int8_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet20/56_cifar10 quantized with the defaults on the 932 training images."""
    pytest.importorskip("torch")
    from resnet_serve.models.catalog import get_variant
    from resnet_serve.models.export import export_variant
    from resnet_serve.models.weights import resolve

    repo = tmp_path_factory.mktemp("int8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(WEIGHTS_HOME))
        for name in CIFAR_MODELS:
            variant = get_variant(name)
            export_variant(
                variant,
                resolve(variant, "default"),
                repo,
                precision="int8",
                calibration=CIFAR_TRAIN,
            )
    return repo
