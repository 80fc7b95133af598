import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from resnet_serve.models import weights as weights_module  # noqa: E402
from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.weights import WeightsError, build_model, resolve  # noqa: E402
from tests.conftest import ROOT, WEIGHTS_HOME  # noqa: E402

V20 = get_variant("resnet20_cifar10")


@pytest.fixture
def reference(torch_home) -> dict[str, torch.Tensor]:
    return resolve(V20, "default").state_dict


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {}},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["bare", "state_dict", "model", "state_dict+module", "bare+module"],
)
@pytest.mark.parametrize("suffix", [".pth", ".th"])
def test_local_checkpoint_layouts(tmp_path: Path, reference, wrap, suffix: str) -> None:
    path = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(reference), path)
    weights = resolve(V20, str(path))
    assert weights.pretrained and weights.source == path.name
    model = build_model(V20, weights)
    assert torch.equal(model.conv1.weight, reference["conv1.weight"])


def test_local_safetensors(tmp_path: Path, reference) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.items()}, str(path))
    model = build_model(V20, resolve(V20, str(path)))
    assert torch.equal(model.linear.bias, reference["linear.bias"])


def test_random_weights_are_seeded_and_marked() -> None:
    w = resolve(V20, "random")
    assert w.pretrained is False and w.state_dict is None
    a, b = build_model(V20, w), build_model(V20, w)
    assert torch.equal(a.conv1.weight, b.conv1.weight)


def test_mismatched_weights_are_a_clear_error(tmp_path: Path, reference) -> None:
    path = tmp_path / "w.pth"
    torch.save(reference, path)
    with pytest.raises(WeightsError, match="do not fit resnet56_cifar10"):
        build_model(get_variant("resnet56_cifar10"), resolve(V20, str(path)))


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        resolve(V20, str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        resolve(V20, str(bad))


def test_corrupt_cached_file_fails_the_hash_check(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    real = WEIGHTS_HOME / "hub" / "checkpoints" / V20.weights.filename
    # A valid checkpoint under the wrong name: loads fine, but is not the published file.
    shutil.copy(WEIGHTS_HOME / "hub" / "checkpoints" / "resnet32-d509ac18.th", cache / real.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="sha256"):
        resolve(V20, "default")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_an_unloadable_cached_file_is_a_clear_error(
    tmp_path: Path, monkeypatch, content: bytes
) -> None:
    # Was: torch.load's UnpicklingError escaped as a traceback and ended the whole export.
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / V20.weights.filename).write_bytes(content)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="delete that file") as caught:
        resolve(V20, "default")
    assert str(cache / V20.weights.filename) in str(caught.value)


def _offline_env(torch_home: Path) -> dict[str, str]:
    # A proxy on a closed local port makes every download fail at once, with or without
    # a network, which is what "offline" means for this test.
    env = dict(os.environ, TORCH_HOME=str(torch_home))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        env[var] = "http://127.0.0.1:9"
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    return env


def test_offline_without_cache_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_serve.models.cli",
            "resnet18",
            "--repository",
            str(tmp_path / "repo"),
        ],
        env=_offline_env(tmp_path / "empty-cache"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    cache = tmp_path / "empty-cache" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(cache) in proc.stderr
    assert "--weights PATH" in proc.stderr and "--weights random" in proc.stderr
    assert "TORCH_HOME=" not in proc.stderr  # the shared cache has no resnet18 to offer
    assert not (tmp_path / "repo" / "resnet18").exists()


def test_the_shared_cache_is_the_checkouts_neighbour() -> None:
    assert ROOT.parent / "shared" / "weights" == weights_module.SHARED_WEIGHTS


@pytest.mark.parametrize(
    ("name", "suggested"),
    [("resnet20_cifar10", True), ("resnet110_cifar10", False), ("resnet18", False)],
)
def test_offline_message_suggests_the_shared_cache_only_where_it_has_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, suggested: bool
) -> None:
    variant = get_variant(name)
    in_shared = WEIGHTS_HOME / "hub" / "checkpoints" / variant.weights.filename
    assert in_shared.is_file() is suggested  # the premise: what ../shared/weights holds

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(weights_module, "SHARED_WEIGHTS", WEIGHTS_HOME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError) as info:
        resolve(variant, "default")
    message = str(info.value)
    assert "no cached copy exists" in message and "--weights random" in message
    hint = f"TORCH_HOME={os.path.relpath(WEIGHTS_HOME)}"
    assert (hint in message or f"TORCH_HOME={WEIGHTS_HOME}" in message) is suggested, message
    assert ("TORCH_HOME=" in message) is suggested
