"""The benchmark's request images: natural photos at ImageNet-like sizes, as JPEG (or the
user's own, ``from_path``).

Decode and resize cost depends on what is in the picture and how large it is, so the
corpus is made of real photographs (scikit-image's bundled samples), cut at several
offsets and scales and re-encoded at the sizes and quality of a typical ImageNet
validation image. Noise would compress badly and decode slower than any photo.

The corpus is a pure function of its parameters (a seeded generator, fixed sources),
cached in a directory named after them, so two runs and two machines send the same bytes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs shipped inside the scikit-image wheel (no download): people,
# animals, objects, a vehicle, astronomy, microscopy.
SOURCES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
# (width, height): the common shapes of ImageNet validation images, landscape and portrait.
SIZES = ((500, 375), (640, 480), (500, 333), (375, 500), (600, 400), (480, 640), (512, 384))
QUALITY = 90
# Bump when the recipe changes, so that stale caches are not reused.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class CorpusSpec:
    count: int = 64
    seed: int = 0
    quality: int = QUALITY

    @property
    def key(self) -> str:
        # SOURCES, SIZES and the cutting recipe are covered by RECIPE_VERSION.
        return f"corpus-v{RECIPE_VERSION}-n{self.count}-s{self.seed}-q{self.quality}"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resnet-bench"


def _source(name: str) -> Image.Image:
    try:
        data_dir = resources.files("skimage") / "data"
    except ModuleNotFoundError:
        raise RuntimeError(
            "the benchmark corpus is cut from scikit-image's sample photos: "
            'install the bench extra (pip install -e ".[bench]")'
        ) from None
    with resources.as_file(data_dir / name) as path, Image.open(path) as img:
        return img.convert("RGB")


def _cut(src: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A crop of ``src`` with the aspect ratio of ``size`` (55-100% of the largest such
    crop, at a random offset), resized to ``size``."""
    w, h = src.size
    tw, th = size
    scale = min(w / tw, h / th) * float(rng.uniform(0.55, 1.0))
    cw, ch = max(1, round(tw * scale)), max(1, round(th * scale))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    crop = src.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop.resize(size, Image.Resampling.LANCZOS)


def generate(spec: CorpusSpec) -> list[bytes]:
    """The corpus' JPEG files, in order (deterministic for a given Pillow/libjpeg)."""
    rng = np.random.default_rng(spec.seed)
    sources = [_source(name) for name in SOURCES]
    out: list[bytes] = []
    for i in range(spec.count):
        src = sources[i % len(sources)]
        size = SIZES[(i // len(sources) + i) % len(SIZES)]
        buf = io.BytesIO()
        _cut(src, size, rng).save(buf, "JPEG", quality=spec.quality)
        out.append(buf.getvalue())
    return out


def load(spec: CorpusSpec = CorpusSpec(), cache_dir: Path | None = None) -> list[bytes]:
    """The corpus from ``cache_dir/<key>/``, generated and written there first if absent."""
    directory = (cache_dir or default_cache_dir()) / spec.key
    names = [f"{i:04d}.jpg" for i in range(spec.count)]
    if all((directory / n).is_file() for n in names):
        return [(directory / n).read_bytes() for n in names]
    images = generate(spec)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in zip(names, images, strict=True):
        # Written under a temporary name and renamed: a concurrent or interrupted run
        # never leaves a truncated file that a later run would take as cached.
        tmp = directory / f".{name}.{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(directory / name)
    return images


# The leading bytes of the formats a folder of images is likely to hold: each part of a
# request names its type as a browser or curl would (servers may check it).
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpg", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
    (b"GIF8", "gif", "image/gif"),
    (b"BM", "bmp", "image/bmp"),
    (b"II*\x00", "tif", "image/tiff"),
    (b"MM\x00*", "tif", "image/tiff"),
)


def image_type(data: bytes) -> tuple[str, str]:
    """``(extension, media type)`` of an encoded image, from its first bytes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    for magic, ext, mime in _SIGNATURES:
        if data.startswith(magic):
            return ext, mime
    return "bin", "application/octet-stream"


def formats(images: list[bytes]) -> dict[str, int]:
    """How many images of each type (by extension)."""
    counts: dict[str, int] = {}
    for data in images:
        ext = image_type(data)[0]
        counts[ext] = counts.get(ext, 0) + 1
    return dict(sorted(counts.items()))


def from_path(path: Path) -> list[bytes]:
    """The images to send from ``path``: a folder's files in name order (hidden ones
    skipped), or an .npz's ``images`` (uint8 ``[N, H, W, 3]``), each encoded as a PNG."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        images = [f.read_bytes() for f in files]
    elif path.suffix == ".npz":
        with np.load(path) as data:
            arrays = data["images"]
        if arrays.dtype != np.uint8 or arrays.ndim != 4 or arrays.shape[-1] != 3:
            raise ValueError(
                f"`images` must be uint8 [N, H, W, 3], not {arrays.dtype} {arrays.shape}"
            )
        images = []
        for array in arrays:
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, "PNG")
            images.append(buf.getvalue())
    else:
        raise ValueError("not a folder or an .npz file")
    if not images:
        raise ValueError("no images there")
    return images
