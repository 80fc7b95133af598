"""The pre-activation ResNets: the paper's CIFAR nets (shape, parameter counts, units) and
timm's ResNetV2 key layout; ONNX export, stage maps, int8 and fp16 of a CIFAR one."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from resnet_serve.models import preact, quantize  # noqa: E402
from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.export import export_variant, relative_error  # noqa: E402
from resnet_serve.models.weights import Weights, build_model, resolve  # noqa: E402
from tests.conftest import CIFAR_TRAIN  # noqa: E402
from tests.models.helpers import random_state_dict  # noqa: E402
from tests.models.test_catalog import PREACT_CIFAR, TIMM  # noqa: E402

# Key -> shape of timm's resnetv2_50/101 state dicts, read from timm's own model code by
# tools/timm_source.py.
TIMM_MANIFEST = (
    Path(__file__).resolve().parents[1] / "data" / "timm_resnetv2_state_dict_manifest.json"
)
# He et al. (2016), table 2 and section 4: parameters in millions.
PAPER_PARAMS_M = {110: 1.7, 164: 1.7, 1001: 10.2}
# timm's model cards (Params (M)) round these: 25.5 and 44.5.
TIMM_NUM_PARAMS = {"resnetv2_50": 25549352, "resnetv2_101": 44541480}


@cache
def timm_manifest() -> dict[str, dict[str, list[int]]]:
    return json.loads(TIMM_MANIFEST.read_text())["models"]


def random_weights(name: str, seed: int = 0) -> Weights:
    """A state dict of the variant's layout with random BN statistics; each unit's last
    normalisation scaled down so that deep nets stay finite (as the slow parity test of the
    post-activation family does)."""
    model = build_model(get_variant(name), resolve(get_variant(name), "random"))
    state = random_state_dict({k: list(v.shape) for k, v in model.state_dict().items()}, seed)
    last = "conv3" if isinstance(model.stages[0].blocks[0], preact.PreActBottleneck) else "conv2"
    for key in state:
        if key.startswith("stages.") and key.endswith(f".{last}.weight"):
            state[key] = state[key] * 0.2
    return Weights(state, "test:random-bn", None, False)


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS_M))
def test_paper_depth_and_parameter_count(depth: int) -> None:
    model = getattr(preact, f"preact_resnet{depth}_cifar10")()
    bottleneck = depth != 110
    n = (depth - 2) // (9 if bottleneck else 6)
    assert [len(s.blocks) for s in model.stages] == [n, n, n]
    assert model.embedding_dim == (256 if bottleneck else 64)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(PAPER_PARAMS_M[depth], rel=0.02)


def test_bad_depth() -> None:
    with pytest.raises(ValueError, match="9n\\+2"):
        preact._cifar(165, bottleneck=True)


def test_units_are_pre_activation_with_identity_shortcuts() -> None:
    model = preact.preact_resnet164_cifar10().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():  # non-trivial BN, so that norm1(x) != relu(x)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
        x = torch.randn(2, 256, 8, 8, generator=g)
        unit = model.stages[2].blocks[1]
        # BN-ReLU before the convolutions; the shortcut is x itself.
        assert unit.downsample is None
        torch.testing.assert_close(unit(x), unit.residual(unit.norm1(x)) + x, rtol=0, atol=0)
        # The first unit after conv1 activates once, before the split (the paper's section 4).
        first = model.stages[0].blocks[0]
        x = torch.randn(2, 16, 32, 32, generator=g)
        expected = first.residual(first.norm1(x)) + first.downsample(first.norm1(x))
        torch.testing.assert_close(first(x), expected, rtol=0, atol=0)
    # The paper's CIFAR code strides the first 1x1; timm's ImageNet nets the 3x3.
    assert model.stages[1].blocks[0].conv1.stride == (2, 2)
    assert preact.resnetv2_50().stages[1].blocks[0].conv2.stride == (2, 2)


def test_final_bn_relu_precedes_the_pooling() -> None:
    name = "preact_resnet110_cifar10"
    model = build_model(get_variant(name), random_weights(name))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding, (last,) = model.forward_stages(x, ("layer3",))
        raw = model.stages[2](model.stages[1](model.stages[0](model.stem(x))))
    torch.testing.assert_close(last, model.norm(raw))
    assert last.min() >= 0
    torch.testing.assert_close(embedding, last.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["resnetv2_50", "resnetv2_101"])
def test_timm_state_dict_loads_strictly(name: str) -> None:
    model = getattr(preact, name)()
    shapes = timm_manifest()[name]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    state = random_state_dict(shapes)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.head.fc.weight, state["head.fc.weight"])
    assert sum(p.numel() for p in model.parameters()) == TIMM_NUM_PARAMS[name]


def test_cifar_variants_have_no_weights_and_claim_no_accuracy() -> None:
    for name in PREACT_CIFAR:
        v = get_variant(name)
        assert v.weights is None and v.num_classes == 10 and v.family == "preact_cifar"


@pytest.fixture(scope="session")
def preact110_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Weights]:
    """preact_resnet110_cifar10, random weights with random BN statistics, every stage."""
    weights = random_weights("preact_resnet110_cifar10")
    out = export_variant(
        get_variant("preact_resnet110_cifar10"),
        weights,
        tmp_path_factory.mktemp("preact"),
        features=("layer1", "layer2", "layer3"),
    )
    return out, weights


def test_cifar_export_parity_and_stage_maps(preact110_export) -> None:
    out, weights = preact110_export
    variant = get_variant("preact_resnet110_cifar10")
    meta = json.loads((out / "model.json").read_text())
    assert meta["family"] == "preact_cifar" and meta["embedding_dim"] == 64
    assert [(f["name"], f["channels"], f["stride"]) for f in meta["features"]] == [
        ("layer1", 16, 1), ("layer2", 32, 2), ("layer3", 64, 4),
    ]  # fmt: skip
    assert max(meta["parity_max_rel_err"].values()) < 1e-4
    images = np.random.default_rng(7).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {"images": images}), strict=True))
    model = build_model(variant, weights)
    mean = torch.tensor(variant.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(variant.preprocess.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        embedding, maps = model.forward_stages(x, model.stage_names)
        expected = {"logits": model.forward_head(embedding), "embedding": embedding}
        expected.update(zip(model.stage_names, maps, strict=True))
    for name, tensor in expected.items():
        assert relative_error(tensor.numpy(), got[name]) < 1e-4, name


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_cifar_lower_precision(
    preact110_export, tmp_path: Path, precision: str, record_property
) -> None:
    # export_variant(precision=...) would export the same fp32 graph again; what depends on
    # the architecture is the conversion, so it runs on the fixture's verified fp32 graph.
    # No trained weights exist here: this checks the conversion and the serving contract on
    # real CIFAR images, not accuracy (random nets' top-1 agreement says little).
    fp32_dir, _ = preact110_export
    variant = get_variant("preact_resnet110_cifar10")
    source = CIFAR_TRAIN if precision == "int8" else None
    calibration = quantize.prepare(precision, source, variant.preprocess, limit=64)
    out = tmp_path / "model.onnx"
    lowered = quantize.lower_precision(
        fp32_dir / "model.onnx",
        out,
        precision,
        variant.preprocess,
        calibration=calibration,
        min_agreement=0.5,
    )
    check = lowered["precision_check"]
    record_property("agreement_with_fp32", check["top1_agreement"])
    print(f"{precision}: {check}")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["logits", "embedding", "layer1", "layer2", "layer3"]
    outputs = session.run(names, {"images": np.zeros((3, 32, 32, 3), np.uint8)})
    assert [o.shape for o in outputs[:2]] == [(3, 10), (3, 64)]
    assert all(o.dtype == np.float32 for o in outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", PREACT_CIFAR + TIMM)
def test_full_family_parity(tmp_path: Path, name: str) -> None:
    from tests.models.helpers import manifest

    variant = get_variant(name)
    if variant.family == "preact_cifar":
        weights = random_weights(name)
    else:
        layout = timm_manifest() if name.startswith("resnetv2") else manifest()
        weights = Weights(random_state_dict(layout[name.split(".")[0]]), "test", None, False)
    out = export_variant(variant, weights, tmp_path)
    meta = json.loads((out / "model.json").read_text())
    assert max(meta["parity_max_rel_err"].values()) < 1e-4
