"""Fine-tuned weights as the reference training scripts save them: torchvision's
references/classification/train.py and timm's train.py (through timm's own CheckpointSaver),
trained weights by default, the EMA copy with ``ema`` / ``--ema``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.cli import main as cli_main  # noqa: E402
from resnet_serve.models.weights import WeightsError, build_model, resolve  # noqa: E402

V20 = get_variant("resnet20_cifar10")


def _scaled(state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Weights that differ from ``state`` and still give finite outputs."""
    return {k: v * factor if v.is_floating_point() else v for k, v in state.items()}


@pytest.fixture
def torchvision_checkpoint(tmp_path: Path) -> tuple[Path, dict, dict]:
    """What torchvision's references/classification/train.py saves each epoch: the model,
    optimizer, scheduler, epoch, its argparse arguments and, with --model-ema, the EMA model
    (an AveragedModel: ``module.<key>`` plus ``n_averaged``)."""
    model = build_model(V20, resolve(V20, "random"))
    ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    ema.module.load_state_dict(_scaled(model.state_dict(), 0.9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": 4,
        "args": argparse.Namespace(model="resnet20", lr=0.1, model_ema=True, device="cuda"),
        "model_ema": ema.state_dict(),
    }
    assert "n_averaged" in checkpoint["model_ema"]
    path = tmp_path / "model_4.pth"
    torch.save(checkpoint, path)
    return path, model.state_dict(), ema.module.state_dict()


def test_torchvision_reference_checkpoint(torchvision_checkpoint) -> None:
    path, trained, averaged = torchvision_checkpoint
    weights = resolve(V20, str(path))
    assert weights.source == path.name
    assert torch.equal(build_model(V20, weights).conv1.weight, trained["conv1.weight"])
    ema = resolve(V20, str(path), ema=True)
    assert ema.source == f"{path.name}#ema" and "n_averaged" not in ema.state_dict
    assert torch.equal(build_model(V20, ema).conv1.weight, averaged["conv1.weight"])


def test_timm_train_checkpoint_via_its_checkpoint_saver(timm, tmp_path: Path) -> None:
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = timm.create_model("resnet18")
    ema = ModelEmaV3(model)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.mul_(0.9)
    saver = CheckpointSaver(
        model,
        torch.optim.AdamW(model.parameters()),
        args=argparse.Namespace(model="resnet18", lr=1e-3, model_ema=True),
        model_ema=ema,
        checkpoint_dir=str(tmp_path),
        recovery_dir=str(tmp_path),
    )
    saver.save_checkpoint(epoch=0, metric=0.5)
    variant = get_variant("resnet18.a1_in1k")  # timm's resnet18 has torchvision's layout
    for file in ("last.pth.tar", "model_best.pth.tar"):
        trained = build_model(variant, resolve(variant, str(tmp_path / file)))
        assert torch.equal(trained.fc.weight, model.fc.weight)
        averaged = build_model(variant, resolve(variant, str(tmp_path / file), ema=True))
        assert torch.equal(averaged.fc.weight, ema.module.fc.weight)


def test_ema_of_a_checkpoint_without_one_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save({"model": build_model(V20, resolve(V20, "random")).state_dict()}, path)
    with pytest.raises(WeightsError, match=r"no EMA weights .* it has model"):
        resolve(V20, str(path), ema=True)
    with pytest.raises(WeightsError, match="from a checkpoint file"):
        resolve(V20, "default", ema=True)


def test_cli_ema(torchvision_checkpoint, tmp_path: Path, capsys) -> None:
    path, _, _ = torchvision_checkpoint
    assert cli_main(["resnet20_cifar10", "--repository", str(tmp_path), "--ema"]) == 2
    assert "--weights PATH" in capsys.readouterr().err
    rc = cli_main(
        ["resnet20_cifar10", "--repository", str(tmp_path / "r"), "--weights", str(path), "--ema"]
    )
    assert rc == 0
    meta = json.loads((tmp_path / "r" / "resnet20_cifar10" / "model.json").read_text())
    assert meta["weights"]["source"].endswith("model_4.pth#ema")
