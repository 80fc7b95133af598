"""What the client accepts as an image, and how each goes on the wire."""

from __future__ import annotations

import io
import mimetypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

# A file path, encoded bytes (JPEG, PNG, ...), a PIL image, or a uint8 [H, W, 3] / [H, W]
# array (RGB or grey).
ImageLike: TypeAlias = "str | os.PathLike[str] | bytes | np.ndarray | Any"
Part = tuple[str, tuple[str, bytes, str]]


def _png(array: np.ndarray) -> bytes:
    from PIL import Image  # only when arrays are given

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")  # lossless: the model sees these pixels
    return buf.getvalue()


# Modes PNG holds as they are; integer and float images go as TIFF, which the service scales
# to 8 bits as it does a file of theirs; any other (CMYK, YCbCr, LAB, HSV) becomes RGB, the
# service's own conversion.
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})
TIFF_MODES = frozenset({"I", "F"})


def _pil(image: Any, index: int) -> tuple[str, bytes, str]:
    from PIL import ImageOps

    # Upright by its EXIF orientation, as the service makes the file it was opened from:
    # the re-encoded image carries no EXIF.
    image = ImageOps.exif_transpose(image)
    fmt = "TIFF" if image.mode in TIFF_MODES else "PNG"
    if fmt == "PNG" and image.mode not in PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, fmt)  # lossless either way
    ext = fmt.lower()
    return (f"image-{index}.{ext}", buf.getvalue(), f"image/{ext}")


def encode(image: ImageLike, index: int) -> Part:
    """One multipart ``file`` part."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return ("file", (path.name, path.read_bytes(), kind))
    if isinstance(image, bytes | bytearray | memoryview):
        return ("file", (f"image-{index}", bytes(image), "application/octet-stream"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(
                f"image {index}: an array must be uint8 [H, W, 3] or [H, W], "
                f"not {image.dtype} {list(image.shape)}"
            )
        return ("file", (f"image-{index}.png", _png(image), "image/png"))
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        return ("file", _pil(image, index))
    raise TypeError(f"image {index}: {type(image).__name__} is not an image (path, bytes, "
                    "PIL image or uint8 array)")  # fmt: skip


def is_batch(images: ImageLike | Sequence[ImageLike]) -> bool:
    """A list or tuple of images, or a [N, H, W, C] array; else one image."""
    if isinstance(images, np.ndarray):
        return images.ndim == 4
    return isinstance(images, list | tuple)


def encode_all(images: ImageLike | Sequence[ImageLike]) -> tuple[list[Part], bool]:
    """The parts, and whether the caller gave several (and so gets a list back)."""
    batch = is_batch(images)
    items = list(images) if batch else [images]
    if not items:
        raise ValueError("no images given")
    return [encode(image, i) for i, image in enumerate(items)], batch
