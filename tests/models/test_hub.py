"""timm's weights from the Hugging Face Hub: huggingface_hub's cache and offline mode, the
sha256 check of whatever it returns, and the message when there is no file."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("huggingface_hub")

from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.hub import HubFile  # noqa: E402
from resnet_serve.models.weights import WeightsError, build_model, resolve, sha256_file  # noqa: E402
from tests.models.helpers import manifest, random_state_dict  # noqa: E402

NAME = "resnet18.a1_in1k"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub's cache in tmp_path, offline (what HF_HUB_CACHE and HF_HUB_OFFLINE=1
    set when the client is imported)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_file(cache: Path, hub_file: HubFile, data: bytes) -> Path:
    """Put ``data`` where huggingface_hub looks for ``hub_file`` (refs + snapshot layout)."""
    repo = hub_file.cache_dir(cache)
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / hub_file.revision).write_text(commit)
    path = repo / "snapshots" / commit / hub_file.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def _safetensors(tmp_path: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    state = random_state_dict(manifest()["resnet18"], seed=3)
    save_file(state, str(tmp_path / "w.safetensors"))
    return (tmp_path / "w.safetensors").read_bytes(), state


def test_hub_urls_name_repo_revision_and_file() -> None:
    url = get_variant(NAME).weights.url
    assert HubFile.from_url(url) == HubFile("timm/resnet18.a1_in1k", "main", "model.safetensors")
    with pytest.raises(ValueError, match="not a Hub file URL"):
        HubFile.from_url("https://download.pytorch.org/models/resnet18-f37072fd.pth")


def test_cached_file_is_hash_checked_and_loads_strictly(tmp_path: Path, hub_cache: Path) -> None:
    data, state = _safetensors(tmp_path)
    variant = get_variant(NAME)
    path = _cache_file(hub_cache, HubFile.from_url(variant.weights.url), data)
    # Not the published file: the catalog's sha256 refuses it.
    with pytest.raises(WeightsError, match="not the published file"):
        resolve(variant, "default")
    # The same file with its own hash in the catalog: loaded, strict, provenance recorded.
    digest = sha256_file(path)
    ours = dataclasses.replace(
        variant, weights=dataclasses.replace(variant.weights, sha256_prefix=digest)
    )
    weights = resolve(ours, "default")
    assert weights.pretrained and weights.sha256 == digest and weights.source == variant.weights.url
    model = build_model(ours, weights)
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_offline_without_cache_names_the_cache_and_the_alternatives(hub_cache: Path) -> None:
    with pytest.raises(WeightsError) as info:
        resolve(get_variant(NAME), "default")
    message = str(info.value)
    assert str(hub_cache / "models--timm--resnet18.a1_in1k") in message
    for hint in ("HF_HOME", "HF_HUB_OFFLINE=1", "--weights PATH", "--weights random"):
        assert hint in message


def test_cli_offline_follows_hf_home_without_a_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_serve.models.cli",
            NAME,
            "--repository",
            str(tmp_path / "repo"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k") in proc.stderr
    assert not (tmp_path / "repo" / NAME).exists()
