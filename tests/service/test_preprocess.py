from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from resnet_serve.contract.preprocess import DecodeOptions, preprocess, preprocess_array
from resnet_serve.contract.schema import PreprocessSpec
from resnet_serve.service.errors import (
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedImageFormatError,
)

SPEC = PreprocessSpec(resize=232, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
OPTS = DecodeOptions()


def save(img: Image.Image, fmt: str, **kw) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int = 300, h: int = 200) -> np.ndarray:
    """A smooth, non-symmetric test picture (gradients), so crops and rotations show."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def test_resize_shorter_side_then_center_crop_like_torchvision() -> None:
    arr = photo(300, 200)
    out = preprocess(save(Image.fromarray(arr), "PNG"), 0, SPEC, OPTS)
    # torchvision: Resize(232) -> (348, 232) [long = int(232 * 300 / 200)], CenterCrop(224)
    ref = Image.fromarray(arr).resize((348, 232), Image.Resampling.BILINEAR)
    left, top = round((348 - 224) / 2), round((232 - 224) / 2)
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(preprocess_array(arr, SPEC), ref)


def test_exact_size_is_untouched() -> None:
    spec = PreprocessSpec(resize=32, crop=32, mean=(0,) * 3, std=(1,) * 3)
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(save(Image.fromarray(arr), "PNG"), 0, spec, OPTS), arr)


def test_exif_orientation_is_applied() -> None:
    arr = photo(300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    tagged = save(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    upright = np.ascontiguousarray(np.rot90(arr, k=-1))  # what a viewer shows
    expected = preprocess(save(Image.fromarray(upright), "JPEG", quality=95), 0, SPEC, OPTS)
    got = preprocess(tagged, 0, SPEC, DecodeOptions(jpeg_draft=False))
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 3


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    img = Image.fromarray(photo()).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(Image.fromarray(photo()).convert("L"), np.uint16) * 257)
        assert img.mode.startswith("I;16")
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    out = preprocess(save(img, fmt), 0, SPEC, OPTS)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_16_bit_scaling_is_exact_for_every_value() -> None:
    # In float32 now (the float64 copy of a large image was seconds): the same bytes as
    # rint(v / 257) in float64, for each of the 65536 values.
    from resnet_serve.contract.preprocess import decode

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    data = save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    expected = np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    rgb = np.asarray(decode(data, 0, SPEC, OPTS))
    assert all(np.array_equal(rgb[:, :, c], expected) for c in range(3))


def test_16_bit_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.full((240, 240), 65535, np.uint16))
    out = preprocess(save(img, "PNG"), 0, SPEC, OPTS)
    assert out.min() == 255
    half = Image.fromarray(np.full((240, 240), 32896, np.uint16))  # 128 * 257
    assert np.all(preprocess(save(half, "PNG"), 0, SPEC, OPTS) == 128)


def test_palette_with_transparency() -> None:
    img = Image.fromarray(photo()).convert("P")
    img.info["transparency"] = 0
    out = preprocess(save(img, "PNG", transparency=0), 0, SPEC, OPTS)
    assert out.shape == (224, 224, 3)


def test_gif_first_frame() -> None:
    red = Image.new("RGB", (240, 240), (255, 0, 0))
    blue = Image.new("RGB", (240, 240), (0, 0, 255))
    data = save(red, "GIF", save_all=True, append_images=[blue])
    out = preprocess(data, 0, SPEC, OPTS)
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_jpeg_draft_keeps_the_result_close() -> None:
    arr = np.asarray(Image.fromarray(photo(300, 200)).resize((1200, 800)))
    data = save(Image.fromarray(arr), "JPEG", quality=92)
    fast = preprocess(data, 0, SPEC, DecodeOptions(jpeg_draft=True)).astype(int)
    full = preprocess(data, 0, SPEC, DecodeOptions(jpeg_draft=False)).astype(int)
    assert fast.shape == full.shape == (224, 224, 3)
    assert np.abs(fast - full).mean() < 2.0


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImageError),
        (b"garbage" * 10, InvalidImageError),
        (save(Image.fromarray(photo()), "PNG")[:300], InvalidImageError),
        (save(Image.fromarray(photo()), "JPEG")[:500], InvalidImageError),
        (save(Image.new("RGB", (32, 32)), "ICO"), UnsupportedImageFormatError),
    ],
    ids=["empty", "garbage", "truncated-png", "truncated-jpeg", "ico"],
)
def test_bad_input_is_a_typed_error_naming_the_index(data: bytes, error: type) -> None:
    with pytest.raises(error) as exc:
        preprocess(data, 7, SPEC, OPTS)
    assert exc.value.index == 7 and "image 7" in exc.value.message


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = save(Image.new("RGB", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLargeError, match="image 2"):
        preprocess(data, 2, SPEC, DecodeOptions(max_pixels=1_000_000))
