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
