"""Stage feature maps as extra graph outputs: equal to PyTorch's intermediate outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.export import ExportError, export_variant, relative_error  # noqa: E402
from resnet_serve.models.weights import Weights, build_model, resolve  # noqa: E402
from tests.models.helpers import manifest, random_state_dict  # noqa: E402


def _hooked_stage_outputs(model, images: np.ndarray, mean, std) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Each stage's output, captured by forward hooks on the plain PyTorch module."""
    captured: dict[str, np.ndarray] = {}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().numpy())
        )
        for name in model.stage_names
    ]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return captured


@pytest.mark.parametrize(
    ("name", "strides"),
    [("resnet18", [4, 8, 16, 32]), ("resnet50", [4, 8, 16, 32]), ("resnet20_cifar10", [1, 2, 4])],
)
def test_stage_maps_equal_pytorch_intermediate_outputs(tmp_path: Path, name, strides) -> None:
    variant = get_variant(name)
    if variant.family == "cifar":
        weights = resolve(variant, "random")
    else:  # a state dict in torchvision's layout
        weights = Weights(random_state_dict(manifest()[name]), "test", None, False)
    model = build_model(variant, weights).eval()
    out = export_variant(variant, weights, tmp_path, features=tuple(model.stage_names))
    meta = json.loads((out / "model.json").read_text())
    assert [f["name"] for f in meta["features"]] == list(model.stage_names)
    assert [f["stride"] for f in meta["features"]] == strides
    crop = variant.preprocess.crop
    images = np.random.default_rng(3).integers(0, 256, (2, crop, crop, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["logits", "embedding", *model.stage_names]
    got = dict(zip(names, session.run(names, {"images": images}), strict=True))
    expected = _hooked_stage_outputs(model, images, variant.preprocess.mean, variant.preprocess.std)
    for stage, spec in zip(model.stage_names, meta["features"], strict=True):
        assert got[stage].shape == expected[stage].shape == (2, *spec["shape"][1:])
        assert spec["channels"] == expected[stage].shape[1]
        assert relative_error(expected[stage], got[stage]) < 1e-4
    # The pooled embedding is the average of the last stage's map.
    np.testing.assert_allclose(
        got[model.stage_names[-1]].mean(axis=(2, 3)), got["embedding"], rtol=1e-4, atol=1e-5
    )


def test_unknown_stage_is_a_clear_error(tmp_path: Path) -> None:
    variant = get_variant("resnet20_cifar10")
    with pytest.raises(ExportError, match="no stage layer4; this model has layer1, layer2, layer3"):
        export_variant(variant, resolve(variant, "random"), tmp_path, features=("layer4",))
