import re
import subprocess
import sys

import pytest

from resnet_serve.models.catalog import VARIANTS, UnknownVariantError, get_variant

IMAGENET = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip
CIFAR = [f"resnet{d}_cifar10" for d in (20, 32, 44, 56, 110, 1202)]
PREACT_CIFAR = [f"preact_resnet{d}_cifar10" for d in (110, 164, 1001)]
TIMM = ["resnet18.a1_in1k", "resnet50.a1_in1k", "resnet101.a1h_in1k", "resnetv2_50", "resnetv2_101"]


def test_every_named_variant_is_in_the_catalog() -> None:
    assert set(VARIANTS) == set(IMAGENET + CIFAR + PREACT_CIFAR + TIMM)


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_variant_data_is_complete(name: str) -> None:
    v = get_variant(name)
    labels = v.labels()
    assert len(labels) == v.num_classes == len(set(labels))
    assert v.weights is not None
    assert re.fullmatch(r"[0-9a-f]{8}", v.weights.sha256_prefix)
    assert v.weights.filename.split("-")[-1].startswith(v.weights.sha256_prefix)
    pre = v.preprocess
    assert pre.crop <= pre.resize
    assert len(pre.mean) == len(pre.std) == 3
    assert pre.interpolation == "bilinear"


def test_imagenet_labels_and_weights() -> None:
    v = get_variant("resnet50")
    assert v.labels()[207] == "golden retriever"
    assert v.labels()[0] == "tench"
    # torchvision's recommended weights for resnet50 are IMAGENET1K_V2 with resize 232.
    assert v.weights.url == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert (v.preprocess.resize, v.preprocess.crop) == (232, 224)
    assert get_variant("resnet18").preprocess.resize == 256


def test_cifar_variant() -> None:
    v = get_variant("resnet20_cifar10")
    assert v.labels() == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]  # fmt: skip
    assert v.weights.url == (
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/"
        "pretrained_models/resnet20-12fca82f.th"
    )
    assert (v.preprocess.resize, v.preprocess.crop) == (32, 32)


def test_unknown_variant_names_the_known_ones() -> None:
    with pytest.raises(UnknownVariantError, match="resnet18"):
        get_variant("resnet19")


@pytest.mark.parametrize("name", TIMM)
def test_timm_variants(name: str) -> None:
    v = get_variant(name)
    assert v.num_classes == len(v.labels()) == 1000 and v.labels()[207] == "golden retriever"
    # timm's eval transform: resize floor(224 / 0.95) = 235, crop 224; at test size 288 / 1.0.
    assert (v.preprocess.resize, v.preprocess.crop, v.preprocess.interpolation) == (
        235, 224, "bicubic",
    )  # fmt: skip
    test = v.at_test_size()
    assert (test.preprocess.resize, test.preprocess.crop) == (288, 288)
    assert test.weights.reported_top1 == v.weights.test_top1 > v.weights.reported_top1
    assert test.weights.url == v.weights.url and test.test_preprocess is None
    if v.weights.url.startswith("https://huggingface.co/"):
        assert re.fullmatch(r"[0-9a-f]{64}", v.weights.sha256_prefix)
    else:
        assert v.weights.filename.split("-")[-1].startswith(v.weights.sha256_prefix)


def test_variants_without_a_test_size_refuse_one() -> None:
    with pytest.raises(ValueError, match="no separate test input size"):
        get_variant("resnet50").at_test_size()


def test_list_shows_every_source_and_published_top1(capsys) -> None:
    from resnet_serve.models.cli import main

    assert main(["--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == set(VARIANTS)
    assert "(torchvision, ImageNet-1K)" in lines["resnet50"]
    line = lines["resnet50.a1_in1k"]
    assert " bicubic  80.382 " in line and "timm, Hugging Face Hub" in line
    assert "81.24 at 288 with --test-size" in line
    assert "timm, GitHub release" in lines["resnetv2_50"]
    for name in PREACT_CIFAR:  # no published weights: no accuracy claimed
        assert "  null  none published" in lines[name]


def test_test_size_of_a_variant_without_one_is_a_usage_error(tmp_path, capsys) -> None:
    from resnet_serve.models.cli import main

    assert main(["resnet20_cifar10", "--test-size", "--repository", str(tmp_path)]) == 2
    assert "no separate test input size" in capsys.readouterr().err


def test_every_builder_resolves_outside_the_source_tree(tmp_path) -> None:
    """From a directory where the checkout's folders are not importable (as for an
    installed `resnet-export`), each variant's builder names a module of the package."""
    code = (
        "from resnet_serve.models.catalog import VARIANTS\n"
        "bad = [n for n, v in VARIANTS.items() if not callable(v.build_fn())]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for v in VARIANTS.values():
        assert v.builder.startswith("resnet_serve.models."), (v.name, v.builder)
