import pytest

torch = pytest.importorskip("torch")

from resnet_serve.models import cifar  # noqa: E402
from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.weights import build_model, resolve  # noqa: E402

# Parameter counts from the paper's table (He et al. 2015, table 6), in millions.
PAPER_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS_M))
def test_depth_and_parameter_count(depth: int) -> None:
    model = getattr(cifar, f"resnet{depth}_cifar10")()
    n = (depth - 2) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(PAPER_PARAMS_M[depth], rel=0.03)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = cifar.CifarBasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    assert not list(block.shortcut.parameters())


def test_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar.CifarResNet(21)


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_reference_checkpoints_load_strictly(torch_home, depth: int) -> None:
    variant = get_variant(f"resnet{depth}_cifar10")
    weights = resolve(variant, "default")
    assert weights.pretrained and weights.sha256.startswith(variant.weights.sha256_prefix)
    model = build_model(variant, weights)
    assert torch.equal(model.linear.weight, weights.state_dict["linear.weight"])
