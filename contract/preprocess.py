"""Encoded image bytes -> the model's uint8 ``[crop, crop, 3]`` RGB input.

The same steps as torchvision's ``Resize(resize) + CenterCrop(crop)`` on a PIL image:
decode, apply EXIF orientation, convert to RGB, resize the shorter side to ``resize``
(long side ``int(resize * long / short)``), center-crop. Mean/std live in the graph.
Pure functions, run in a thread pool; Pillow releases the GIL while it decodes/resizes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from resnet_serve.contract.schema import IMAGE_FORMATS, PreprocessSpec

DEFAULT_FORMATS = IMAGE_FORMATS
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Our own pixel limit (see DecodeOptions.max_pixels) is checked from the header before
# decoding; Pillow's global guard is only a backstop against formats that lie about it.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image preprocessing refuses: the client's input. Names the image's position in
    its request; the runtime's error table gives each subclass its status."""

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.message = f"image {index}: {reason}"
        super().__init__(self.message)


class InvalidImageError(ImageError):
    """Not an image, or one that cannot be decoded."""


class ImageTooLargeError(ImageError):
    """Over the pixel limit, as sent or once resized."""


class UnsupportedImageFormatError(ImageError):
    def __init__(self, index: int, fmt: str, allowed: list[str]) -> None:
        super().__init__(index, f"format {fmt} is not accepted (accepted: {', '.join(allowed)})")


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = DEFAULT_FORMATS
    # DCT-domain downscale for JPEG (Image.draft), kept above the resize target.
    jpeg_draft: bool = True


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, matching ``Image.convert('RGB')`` where that is right.

    Alpha is dropped, as torchvision-style pipelines do; 16/32-bit integer and float
    images are scaled to 8 bits instead of clipped (``convert`` would saturate them).
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        # rint(v / 257) in float32, the same bytes as in float64 (v / 257 is never within
        # 1/514 of halfway): the float64 copy of a large image was seconds of CPU.
        gray = np.rint(np.asarray(img).astype(np.float32) / np.float32(257)).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when P+transparency goes straight to RGB
    return img.convert("RGB")


def decode(data: bytes, index: int, spec: PreprocessSpec, options: DecodeOptions) -> Image.Image:
    """Decode one image to RGB, upright; errors name the image's position ``index``."""
    if not data:
        raise InvalidImageError(index, "empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise InvalidImageError(index, "not a recognised image") from None
    except Exception as exc:
        raise InvalidImageError(index, f"cannot read image ({exc})") from None
    fmt = img.format or "unknown"
    if fmt not in options.formats:
        raise UnsupportedImageFormatError(index, fmt, list(options.formats))
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(index, "image has no pixels")
    if width * height > options.max_pixels:
        raise ImageTooLargeError(
            index, f"{width}x{height} exceeds the limit of {options.max_pixels} pixels"
        )
    resized = resized_size(width, height, spec.resize)
    if resized[0] * resized[1] > options.max_pixels:
        # A thin image is small, but resizing its shorter side up makes it huge
        # (1x100000 -> 32x3200000): refused before anything is decoded or allocated.
        raise ImageTooLargeError(
            index,
            f"{width}x{height} would be {resized[0]}x{resized[1]} once resized, over the "
            f"limit of {options.max_pixels} pixels",
        )
    try:
        if fmt == "JPEG" and options.jpeg_draft and img.mode in ("RGB", "L", "YCbCr"):
            # draft() picks the largest 1/2^k scale whose both sides stay >= the requested
            # square, so the shorter side never drops below the resize target.
            img.draft("RGB", (spec.resize, spec.resize))
        img.seek(0)  # first frame of animations
        img.load()
        # In place: without an orientation tag the copying variant would copy the whole image.
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:  # truncated or corrupt data: the client's input, never a 500
        raise InvalidImageError(index, f"cannot decode image ({exc})") from None


def resized_size(w: int, h: int, resize: int) -> tuple[int, int]:
    """``(width, height)`` once the shorter side is resized to ``resize``."""
    short, long = (w, h) if w <= h else (h, w)
    if short == resize:
        return w, h
    new_long = int(resize * long / short)
    return (resize, new_long) if w <= h else (new_long, resize)


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side to ``spec.resize``, center-crop ``spec.crop``: uint8 HWC."""
    size = resized_size(*img.size, spec.resize)
    if size != img.size:
        img = img.resize(size, _RESAMPLE[spec.interpolation])
    w, h = size
    c = spec.crop
    if (w, h) != (c, c):
        left = round((w - c) / 2.0)
        top = round((h - c) / 2.0)
        img = img.crop((left, top, left + c, top + c))
    return np.asarray(img, dtype=np.uint8)


def preprocess(data: bytes, index: int, spec: PreprocessSpec, options: DecodeOptions) -> np.ndarray:
    return resize_crop(decode(data, index, spec, options), spec)


def preprocess_array(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The same resize and crop for an already decoded uint8 RGB ``[H, W, 3]`` array
    (calibration sets, benchmarks)."""
    return resize_crop(Image.fromarray(np.ascontiguousarray(image)), spec)


def warm_decoder(spec: PreprocessSpec, options: DecodeOptions) -> None:
    """Pay the decoder's one-time costs before the first request does: Pillow imports its
    format plugins on the first open (~30 ms, measured), and each decode thread's first
    image allocates its buffers. Decodes a small PNG and JPEG through ``preprocess``."""
    Image.init()
    image = Image.fromarray(np.zeros((spec.crop + 1, spec.crop + 1, 3), np.uint8))
    for fmt in ("PNG", "JPEG"):
        if fmt in options.formats:
            buf = io.BytesIO()
            image.save(buf, fmt)
            preprocess(buf.getvalue(), 0, spec, options)
