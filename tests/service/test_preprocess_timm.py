"""The runtime's preprocessing of timm's weights (bicubic, resize from crop_pct) against
timm's own eval transform on real photos: identical uint8 crops, and the graph's folded
normalisation within 1e-6 of timm's input tensor."""

from __future__ import annotations

import io
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from resnet_serve.contract.preprocess import DecodeOptions, preprocess  # noqa: E402
from resnet_serve.contract.schema import PreprocessSpec  # noqa: E402
from resnet_serve.models.catalog import get_variant  # noqa: E402
from tests.models.test_timm import timm_eval_transform  # noqa: E402

# scikit-image's bundled colour photos, square, landscape and portrait-ish.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# (x/255 - mean)/std in float32 (timm) against x*scale + shift (the exported graph):
# measured at most 4.8e-7 on these photos.
NORMALISATION_TOLERANCE = 1e-6
CASES = [("resnet50.a1_in1k", False), ("resnet50.a1_in1k", True), ("resnetv2_50", False)]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _timm_transform(timm: ModuleType, name: str, test_size: bool):  # type: ignore[no-untyped-def]
    transform = timm_eval_transform(timm, name, test_size)
    assert [type(t).__name__ for t in transform.transforms] == [
        "Resize", "CenterCrop", "MaybeToTensor", "Normalize",
    ]  # fmt: skip
    return transform


def _spec(name: str, test_size: bool) -> PreprocessSpec:
    """The runtime's spec, from exactly what the export writes into model.json."""
    variant = get_variant(name)
    return PreprocessSpec.from_json(
        (variant.at_test_size() if test_size else variant).preprocess.to_json()
    )


def _timm_crop(transform, image: Image.Image) -> np.ndarray:  # type: ignore[no-untyped-def]
    for step in transform.transforms[:2]:  # the PIL steps: Resize, CenterCrop
        image = step(image)
    return np.asarray(image)


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize(("name", "test_size"), CASES, ids=["default", "test-size", "resnetv2"])
def test_same_crop_and_input_as_timm(timm, photo: str, name: str, test_size: bool) -> None:
    image = Image.fromarray(getattr(skimage_data, photo)())
    transform = _timm_transform(timm, name, test_size)
    spec = _spec(name, test_size)
    ours = preprocess(_encode(image, "PNG"), 0, spec, DecodeOptions())
    np.testing.assert_array_equal(ours, _timm_crop(transform, image))
    mean = np.asarray(spec.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(3, 1, 1)
    # models.export.ServingGraph's affine: scale 1/(255 std), shift -mean/std, in float32.
    graph_input = ours.transpose(2, 0, 1).astype(np.float32) * (1.0 / (255.0 * std)) - mean / std
    theirs = transform(image).numpy()
    assert np.abs(graph_input - theirs).max() <= NORMALISATION_TOLERANCE


@pytest.mark.parametrize("photo", PHOTOS)
def test_jpeg_without_draft_decodes_as_timm(timm, photo: str) -> None:
    # JPEG draft (on by default) decodes large JPEGs at 1/2..1/8 scale before the resize,
    # which timm's full decode does not; with it off the crops are identical.
    data = _encode(Image.fromarray(getattr(skimage_data, photo)()), "JPEG")
    transform = _timm_transform(timm, "resnet50.a1_in1k", False)
    ours = preprocess(data, 0, _spec("resnet50.a1_in1k", False), DecodeOptions(jpeg_draft=False))
    expected = _timm_crop(transform, Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(ours, expected)
