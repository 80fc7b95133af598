"""The variants the build step knows, as data.

Importing this module needs no torch: ``resnet-export --list`` and the tests of the
table run anywhere. Builders are named as ``module:function`` and resolved lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from resnet_serve.contract.schema import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

DATA_DIR = Path(__file__).parent / "data"

# The preprocessing record is the model.json contract's own: one definition for both halves.
Preprocess = PreprocessSpec


@dataclass(frozen=True)
class WeightsSpec:
    url: str
    sha256_prefix: str
    # Top-1 that the weights' publisher reports; shown by --list, never asserted here.
    reported_top1: float | None = None
    # What timm reports at its test input size (Variant.test_preprocess), where it has one.
    test_top1: float | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def publisher(self) -> str:
        return next((who for url, who in _PUBLISHERS if self.url.startswith(url)), self.url)


_PUBLISHERS = (
    ("https://download.pytorch.org/models/", "torchvision"),
    ("https://github.com/akamaster/", "akamaster/pytorch_resnet_cifar10"),
    ("https://huggingface.co/timm/", "timm, Hugging Face Hub"),
    ("https://github.com/rwightman/pytorch-image-models/", "timm, GitHub release"),
)


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
    # timm's test_input_size/test_crop_pct where they differ (resnet-export --test-size).
    test_preprocess: Preprocess | None = None

    def at_test_size(self) -> Variant:
        """This variant with its test-size preprocessing and the top-1 reported there."""
        if self.test_preprocess is None or self.weights is None:
            raise ValueError(f"{self.name} has no separate test input size")
        weights = replace(self.weights, reported_top1=self.weights.test_top1, test_top1=None)
        return replace(self, preprocess=self.test_preprocess, test_preprocess=None, weights=weights)

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


# Pre-activation ResNets (He et al. 2016) for CIFAR-10, as in the paper. No checkpoint of
# them is published in a loadable form (the paper's code is Lua Torch), so they come without
# default weights and no accuracy is claimed: top-1 null, --weights PATH or random.
_PREACT_CIFAR = [f"preact_resnet{depth}_cifar10" for depth in (110, 164, 1001)]

# timm's weights (github.com/huggingface/pytorch-image-models), each with the preprocessing
# of its pretrained_cfg: bicubic, crop 224 at crop_pct 0.95 and a test size of 288 at
# crop_pct 1.0 for all of these, and its mean/std. Top-1 on ImageNet-1K as timm's
# results/results-imagenet.csv reports it at 224 and at 288. The Hub's safetensors are
# checked against the sha256 of the Hub's LFS pointer. For resnetv2_50/101 that hash could
# not be confirmed, so they use the same weights' first publication, timm's GitHub release,
# whose file name carries its sha256 prefix (checked as torchvision's are).
_HF_TIMM = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
_RSB = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Builders are named by module path (module:function), within this package.
_PKG = __package__ + "."
_TIMM = [
    # name, builder, family, weights URL, sha256 (prefix), (mean, std), top-1 @224, @288
    ("resnet18.a1_in1k", _PKG + "resnet:resnet18", "basic", _HF_TIMM.format("resnet18.a1_in1k"),
     "80c49dee3da4822c009c5a7fe591e9223c5a2cfcf95a4067ca4dfb5a7b89c612",
     (IMAGENET_MEAN, IMAGENET_STD), 71.504, 73.164),
    ("resnet50.a1_in1k", _PKG + "resnet:resnet50", "bottleneck",
     _HF_TIMM.format("resnet50.a1_in1k"),
     "773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb",
     (IMAGENET_MEAN, IMAGENET_STD), 80.382, 81.240),
    ("resnet101.a1h_in1k", _PKG + "resnet:resnet101", "bottleneck",
     _HF_TIMM.format("resnet101.a1h_in1k"),
     "1a076c0384295e7d3704f201c5711ff245507db934230bab72ff3014a95f90fe",
     (IMAGENET_MEAN, IMAGENET_STD), 81.950, 82.796),
    ("resnetv2_50", _PKG + "preact:resnetv2_50", "preact", _RSB + "resnetv2_50_a1h-000cdf49.pth",
     "000cdf49", _INCEPTION, 80.410, 81.406),
    ("resnetv2_101", _PKG + "preact:resnetv2_101", "preact",
     _RSB + "resnetv2_101_a1h-5d01f016.pth", "5d01f016", _INCEPTION, 82.042, 83.002),
]  # fmt: skip


def _sha_prefix(filename: str) -> str:
    return filename.rsplit("-", 1)[-1].split(".")[0]


def _imagenet(
    name: str,
    builder: str,
    family: str,
    pre: Preprocess,
    weights: WeightsSpec,
    test_preprocess: Preprocess | None = None,
) -> Variant:
    return Variant(
        name, builder, family, 1000, "imagenet_classes.txt", pre, weights, "ImageNet-1K",
        test_preprocess,
    )  # fmt: skip


def _cifar10(name: str, module: str, family: str, weights: WeightsSpec | None) -> Variant:
    return Variant(
        name, f"{module}:{name}", family, 10, "cifar10_classes.txt", _CIFAR_PRE, weights, "CIFAR-10"
    )


VARIANTS: dict[str, Variant] = {
    **{
        name: _imagenet(
            name,
            _PKG + f"resnet:{name}",
            family,
            pre,
            WeightsSpec(_TV + fname, _sha_prefix(fname), top1),
        )
        for name, family, fname, pre, top1 in _IMAGENET
    },
    **{
        name: _cifar10(
            name,
            _PKG + "cifar",
            "cifar",
            WeightsSpec(_AKAMASTER + fname, _sha_prefix(fname), top1),
        )
        for name, fname, top1 in _CIFAR
    },
    **{name: _cifar10(name, _PKG + "preact", "preact_cifar", None) for name in _PREACT_CIFAR},
    **{
        name: _imagenet(
            name,
            builder,
            family,
            Preprocess.from_crop_pct(224, 0.95, "bicubic", mean, std),
            WeightsSpec(url, sha256, top1, test_top1),
            Preprocess.from_crop_pct(288, 1.0, "bicubic", mean, std),
        )
        for name, builder, family, url, sha256, (mean, std), top1, test_top1 in _TIMM
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
