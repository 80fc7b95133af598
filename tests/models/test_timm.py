"""Our modules against timm's own code (tools/timm_source.py, not a copy): the same outputs
on the same random state dict with random BN statistics, the catalog against each weight's
pretrained_cfg and timm's eval transform, and the ONNX exports against timm's model."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from resnet_serve.models.catalog import Variant, get_variant  # noqa: E402
from resnet_serve.models.export import export_variant, relative_error  # noqa: E402
from resnet_serve.models.hub import HubFile, is_hub_url  # noqa: E402
from resnet_serve.models.weights import Weights, build_model  # noqa: E402
from tests.models.helpers import random_state_dict  # noqa: E402
from tests.models.test_catalog import TIMM  # noqa: E402

SLOW = pytest.mark.slow


def timm_weights_name(name: str) -> str:
    """timm's name of a catalog entry's weights (resnetv2_50 has timm's default tag)."""
    return name if "." in name else f"{name}.a1h_in1k"


def timm_model_and_state(timm: ModuleType, name: str, seed: int = 0):  # type: ignore[no-untyped-def]
    """timm's model of ``name`` loaded with a random state dict of its own layout."""
    theirs = timm.create_model(name.split(".")[0]).eval()
    state = random_state_dict({k: list(v.shape) for k, v in theirs.state_dict().items()}, seed)
    theirs.load_state_dict(state, strict=True)
    return theirs, state


@pytest.mark.parametrize(
    "name",
    ["resnetv2_50", "resnet18.a1_in1k", pytest.param("resnet50.a1_in1k", marks=SLOW),
     pytest.param("resnetv2_101", marks=SLOW), pytest.param("resnet101.a1h_in1k", marks=SLOW)],
)  # fmt: skip
def test_same_outputs_as_timm(timm, name: str) -> None:
    theirs, state = timm_model_and_state(timm, name, seed=2)
    ours = build_model(get_variant(name), Weights(state, "test", None, False))
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        pooled = theirs.forward_head(theirs.forward_features(x), pre_logits=True)
        torch.testing.assert_close(ours.forward_features(x), pooled, rtol=0, atol=0)


def timm_eval_transform(timm: ModuleType, name: str, test_size: bool):  # type: ignore[no-untyped-def]
    """timm's own eval transform for the weights of catalog entry ``name``."""
    cfg = timm.models.get_pretrained_cfg(timm_weights_name(name)).to_dict()
    config = timm.data.resolve_data_config(pretrained_cfg=cfg, use_test_size=test_size)
    return timm.data.create_transform(**config, is_training=False)


def _variant(name: str, test_size: bool) -> Variant:
    variant = get_variant(name)
    return variant.at_test_size() if test_size else variant


@pytest.mark.parametrize("test_size", [False, True], ids=["default", "test-size"])
@pytest.mark.parametrize("name", TIMM)
def test_catalog_follows_timm_pretrained_cfg(timm, name: str, test_size: bool) -> None:
    resize, crop, _, normalize = timm_eval_transform(timm, name, test_size).transforms
    pre = _variant(name, test_size).preprocess
    assert resize.size == pre.resize and tuple(crop.size) == (pre.crop, pre.crop)
    assert resize.interpolation.value == pre.interpolation
    np.testing.assert_allclose(normalize.mean, pre.mean)
    np.testing.assert_allclose(normalize.std, pre.std)
    cfg = timm.models.get_pretrained_cfg(timm_weights_name(name)).to_dict()
    url = get_variant(name).weights.url
    if is_hub_url(url):
        assert HubFile.from_url(url).repo_id == cfg["hf_hub_id"]
    else:  # timm's GitHub release of the same weights: named after the arch and tag
        assert url.rsplit("/", 1)[-1].startswith(f"{name}_{cfg['tag'].split('_')[0]}-")


def _normalised(images: np.ndarray, variant: Variant) -> torch.Tensor:
    """What timm's eval transform makes of the uint8 crops: ToTensor, then Normalize."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(variant.preprocess.mean).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(variant.preprocess.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", ["resnetv2_50", "resnet18.a1_in1k"])
def test_onnx_export_matches_timm(timm, tmp_path: Path, name: str) -> None:
    theirs, state = timm_model_and_state(timm, name, seed=4)
    variant = get_variant(name)
    stages = ("layer1", "layer2", "layer3", "layer4")
    out = export_variant(variant, Weights(state, "test", None, False), tmp_path, features=stages)
    meta = json.loads((out / "model.json").read_text())
    assert max(meta["parity_max_rel_err"].values()) < 1e-4
    assert meta["preprocess"]["interpolation"] == "bicubic"
    crop = variant.preprocess.crop
    images = np.random.default_rng(9).integers(0, 256, (2, crop, crop, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {"images": images}), strict=True))
    x = _normalised(images, variant)
    with torch.no_grad():
        expected = {
            "logits": theirs(x),
            "embedding": theirs.forward_head(theirs.forward_features(x), pre_logits=True),
            # timm's stage outputs, the last after the final norm (what pooling sees).
            **dict(
                zip(
                    stages,
                    theirs.forward_intermediates(
                        x, indices=[1, 2, 3, 4], norm=True, intermediates_only=True
                    ),
                    strict=True,
                )
            ),
        }
    for key, value in expected.items():
        assert relative_error(value.numpy(), got[key]) < 1e-4, key
