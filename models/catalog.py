"""The variants the build step knows, as data.

Importing this module needs no torch: ``resnet-export --list`` and the tests of the
table run anywhere. Builders are named as ``module:function`` and resolved lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """What the runtime does before the graph: resize the shorter side, center-crop.

    ``mean``/``std`` are applied inside the graph; they are recorded so that users
    and other runtimes can reproduce the model's input exactly.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_json(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class WeightsSpec:
    url: str
    sha256_prefix: str
    # Top-1 that the weights' publisher reports; shown by --list, never asserted here.
    reported_top1: float | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Variant:
    name: str
    builder: str
    family: str
    num_classes: int
    labels_file: str
    preprocess: Preprocess
    weights: WeightsSpec | None
    dataset: str

    def build_fn(self) -> Callable[..., Any]:
        module, func = self.builder.split(":")
        return getattr(importlib.import_module(module), func)

    def labels(self) -> list[str]:
        return read_labels(DATA_DIR / self.labels_file)


@cache
def _read_labels_cached(path: str) -> tuple[str, ...]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def read_labels(path: Path) -> list[str]:
    return list(_read_labels_cached(str(path)))


# torchvision's recommended ("DEFAULT") weights; ImageNet-1K top-1 as torchvision reports it.
_TV = "https://download.pytorch.org/models/"
_IMAGENET_V1 = Preprocess(resize=256, crop=224)
_IMAGENET_V2 = Preprocess(resize=232, crop=224)
_IMAGENET = [
    # name, builder, family, weights file, preprocessing, reported top-1
    ("resnet18", "basic", "resnet18-f37072fd.pth", _IMAGENET_V1, 69.758),
    ("resnet34", "basic", "resnet34-b627a593.pth", _IMAGENET_V1, 73.314),
    ("resnet50", "bottleneck", "resnet50-11ad3fa6.pth", _IMAGENET_V2, 80.858),
    ("resnet101", "bottleneck", "resnet101-cd907fc2.pth", _IMAGENET_V2, 81.886),
    ("resnet152", "bottleneck", "resnet152-f82ba261.pth", _IMAGENET_V2, 82.284),
    ("resnext50_32x4d", "grouped", "resnext50_32x4d-1a0047aa.pth", _IMAGENET_V2, 81.198),
    ("resnext101_32x8d", "grouped", "resnext101_32x8d-110c445d.pth", _IMAGENET_V2, 82.834),
    ("resnext101_64x4d", "grouped", "resnext101_64x4d-173b62eb.pth", _IMAGENET_V2, 83.246),
    ("wide_resnet50_2", "wide", "wide_resnet50_2-9ba9bcbe.pth", _IMAGENET_V2, 81.602),
    ("wide_resnet101_2", "wide", "wide_resnet101_2-d733dc28.pth", _IMAGENET_V2, 82.510),
]

# The reference CIFAR-10 checkpoints of github.com/akamaster/pytorch_resnet_cifar10;
# top-1 on the full CIFAR-10 test set as that repository reports it.
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_CIFAR_PRE = Preprocess(resize=32, crop=32)
_CIFAR = [
    ("resnet20_cifar10", "resnet20-12fca82f.th", 91.73),
    ("resnet32_cifar10", "resnet32-d509ac18.th", 92.63),
    ("resnet44_cifar10", "resnet44-014dd654.th", 93.10),
    ("resnet56_cifar10", "resnet56-4bfd9763.th", 93.39),
    ("resnet110_cifar10", "resnet110-1d1ed7c2.th", 93.68),
    ("resnet1202_cifar10", "resnet1202-f3b1deed.th", 93.82),
]


def _sha_prefix(filename: str) -> str:
    return filename.rsplit("-", 1)[-1].split(".")[0]


VARIANTS: dict[str, Variant] = {
    **{
        name: Variant(
            name=name,
            builder=f"models.resnet:{name}",
            family=family,
            num_classes=1000,
            labels_file="imagenet_classes.txt",
            preprocess=pre,
            weights=WeightsSpec(_TV + fname, _sha_prefix(fname), top1),
            dataset="ImageNet-1K",
        )
        for name, family, fname, pre, top1 in _IMAGENET
    },
    **{
        name: Variant(
            name=name,
            builder=f"models.cifar:{name}",
            family="cifar",
            num_classes=10,
            labels_file="cifar10_classes.txt",
            preprocess=_CIFAR_PRE,
            weights=WeightsSpec(_AKAMASTER + fname, _sha_prefix(fname), top1),
            dataset="CIFAR-10",
        )
        for name, fname, top1 in _CIFAR
    },
}


class UnknownVariantError(KeyError):
    def __str__(self) -> str:
        return f"unknown model {self.args[0]!r}; known: {', '.join(VARIANTS)}"


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownVariantError(name) from None
