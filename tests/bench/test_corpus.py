"""The request corpus: real photos, deterministic bytes, ImageNet-like JPEGs."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("skimage", reason="the corpus is cut from scikit-image's sample photos")

from resnet_serve.bench.corpus import SIZES, SOURCES, CorpusSpec, generate, load


def test_generate_is_deterministic_and_seeded() -> None:
    spec = CorpusSpec(count=12)
    first = generate(spec)
    assert first == generate(spec)
    assert first != generate(CorpusSpec(count=12, seed=1))


def test_jpegs_at_imagenet_like_sizes() -> None:
    images = generate(CorpusSpec(count=len(SOURCES) * 3))
    sizes = Counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG"
            assert img.mode == "RGB"
            assert img.size in SIZES
            sizes[img.size] += 1
            # These photos take 0.1-0.4 bytes per pixel at quality 90; uniform noise takes
            # about 0.9, so this fails if the corpus ever degenerates into noise.
            assert len(data) < 0.6 * img.size[0] * img.size[1]
    assert len(sizes) >= 4, "the corpus should mix shapes, landscape and portrait"


def test_load_caches_the_same_bytes(tmp_path: Path) -> None:
    spec = CorpusSpec(count=5)
    written = load(spec, tmp_path)
    files = sorted((tmp_path / spec.key).glob("*.jpg"))
    assert [f.read_bytes() for f in files] == written
    # A second load reads the cache: a marker written into a cached file comes back.
    files[0].write_bytes(b"cached")
    assert load(spec, tmp_path)[0] == b"cached"
    assert load(spec, tmp_path)[1:] == written[1:]


def test_image_types_from_their_first_bytes() -> None:
    from resnet_serve.bench.corpus import formats, image_type

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, fmt)
        return buf.getvalue()

    expected = {
        "JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"), "GIF": ("gif", "image/gif"),
        "BMP": ("bmp", "image/bmp"), "TIFF": ("tif", "image/tiff"), "WEBP": ("webp", "image/webp"),
    }  # fmt: skip
    for fmt, kind in expected.items():
        assert image_type(encoded(fmt)) == kind
    assert image_type(b"not an image") == ("bin", "application/octet-stream")
    assert formats([encoded("PNG"), encoded("JPEG"), encoded("PNG")]) == {"jpg": 1, "png": 2}


def test_images_from_a_folder_or_an_npz(tmp_path: Path) -> None:
    import numpy as np

    from resnet_serve.bench.corpus import from_path

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in (("b.jpg", b"second"), ("a.png", b"first"), (".hidden", b"skipped")):
        (folder / name).write_bytes(data)
    (folder / "sub").mkdir()
    assert from_path(folder) == [b"first", b"second"]

    arrays = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=arrays, labels=np.arange(3))
    pngs = from_path(tmp_path / "set.npz")
    for data, array in zip(pngs, arrays, strict=True):
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "PNG"
            assert (np.asarray(img) == array).all()  # lossless: the pixels as stored

    np.savez(tmp_path / "gray.npz", images=arrays[..., 0])
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, why in (
        (tmp_path / "gray.npz", "uint8 \\[N, H, W, 3\\]"),
        (empty, "no images"),
        (tmp_path / "set.txt", "not a folder or an .npz"),
    ):
        with pytest.raises(ValueError, match=why):
            from_path(bad)
