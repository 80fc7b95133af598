"""Our ImageNet ResNets against torchvision's layout: names, shapes, parameter counts,
and (where torchvision's model code can be loaded) outputs."""

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")

from resnet_serve.models import resnet  # noqa: E402
from tests.models.helpers import manifest, random_state_dict  # noqa: E402
from tests.models.test_catalog import IMAGENET  # noqa: E402

# torchvision's reported parameter counts (its weights' meta "num_params").
NUM_PARAMS = {
    "resnet18": 11689512, "resnet34": 21797672, "resnet50": 25557032, "resnet101": 44549160,
    "resnet152": 60192808, "resnext50_32x4d": 25028904, "resnext101_32x8d": 88791336,
    "resnext101_64x4d": 83455272, "wide_resnet50_2": 68883240, "wide_resnet101_2": 126886696,
}  # fmt: skip


@pytest.mark.parametrize("name", IMAGENET)
def test_torchvision_state_dict_loads_strictly(name: str) -> None:
    model = getattr(resnet, name)()
    shapes = manifest()[name]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    state = random_state_dict(shapes)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS[name]


def test_embedding_dims() -> None:
    assert resnet.resnet18().embedding_dim == 512
    assert resnet.resnet34().embedding_dim == 512
    assert resnet.resnet50().embedding_dim == 2048


def test_forward_is_head_of_features() -> None:
    model = resnet.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 512)
        torch.testing.assert_close(model(x), model.fc(feats))


@pytest.fixture(scope="module")
def tv(torchvision_src: Path) -> Iterator[ModuleType]:
    """torchvision's own model code, from the unpacked wheel (tests/conftest.py). The
    stand-in package it is loaded under leaves sys.modules afterwards, so that no later
    test finds an ops-less ``torchvision``."""
    from tools.torchvision_manifest import load_torchvision_resnet

    before = set(sys.modules)
    try:
        yield load_torchvision_resnet(torchvision_src)
    finally:
        for name in set(sys.modules) - before:
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]


def test_manifest_is_torchvisions(tv: ModuleType) -> None:
    """tests/data's key -> shape manifest, which the loading tests rely on, is what
    torchvision's code gives (tools/torchvision_manifest.py regenerates it)."""
    assert sorted(manifest()) == sorted(IMAGENET)
    for name, shapes in manifest().items():
        with torch.device("meta"):  # shapes only: nothing allocated or initialised
            theirs = {k: list(v.shape) for k, v in getattr(tv, name)().state_dict().items()}
        assert theirs == shapes, name


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_same_outputs_as_torchvision(tv: ModuleType, name: str) -> None:
    theirs = getattr(tv, name)().eval()
    ours = getattr(resnet, name)().eval()
    state = random_state_dict(manifest()[name])
    theirs.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
