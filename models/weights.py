"""Where a model's weights come from: the catalog's URL, a local file, or a seed.

There is no silent fallback: a variant asked for with ``default`` weights either gets
exactly those (hash-checked) or the export stops with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.catalog import Variant

RANDOM_SEED = 0
LOCAL_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".safetensors")


class WeightsError(Exception):
    """Weights could not be had or do not fit the model; the message says why."""


@dataclass(frozen=True)
class Weights:
    state_dict: dict[str, Tensor] | None
    source: str
    sha256: str | None
    pretrained: bool

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "pretrained": self.pretrained}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """A bare state dict, or one held under ``state_dict``/``model``, minus ``module.``."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsError("the checkpoint holds no tensors")
    # DataParallel/DDP checkpoints prefix every key; strip it only when all keys have it.
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _cache_path(variant: Variant) -> Path:
    assert variant.weights is not None
    return Path(torch.hub.get_dir()) / "checkpoints" / variant.weights.filename


def load_default(variant: Variant, progress: bool = False) -> Weights:
    spec = variant.weights
    if spec is None:
        raise WeightsError(f"{variant.name} has no default weights; use --weights PATH or random")
    cached = _cache_path(variant)
    try:
        # check_hash verifies a fresh download against the sha256 prefix in the file name.
        obj = torch.hub.load_state_dict_from_url(
            spec.url, map_location="cpu", progress=progress, check_hash=True, weights_only=True
        )
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WeightsError(
            f"cannot download the default weights of {variant.name} from {spec.url} ({exc}), "
            f"and no cached copy exists at {cached}. Either place the file there "
            f"(the cache follows TORCH_HOME, e.g. TORCH_HOME=../shared/weights), "
            f"or pass --weights PATH to a local .pth/.th/.safetensors file, "
            f"or --weights random for seeded random weights."
        ) from None
    except RuntimeError as exc:
        raise WeightsError(f"default weights of {variant.name} failed to load: {exc}") from None
    # torch.hub checks the hash only when it downloads; a cached file is checked here too.
    digest = sha256_file(cached)
    if not digest.startswith(spec.sha256_prefix):
        raise WeightsError(
            f"{cached} has sha256 {digest[:16]}..., expected a prefix of {spec.sha256_prefix}: "
            "the cached file is corrupt or not the published one; delete it and retry"
        )
    return Weights(unwrap_state_dict(obj), spec.url, digest, pretrained=True)


def load_local(path: Path) -> Weights:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise WeightsError(f"{path}: expected one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's input, reported plainly
        raise WeightsError(f"cannot read weights from {path}: {exc}") from None
    return Weights(unwrap_state_dict(obj), str(path.resolve()), sha256_file(path), pretrained=True)


def resolve(variant: Variant, weights: str, progress: bool = False) -> Weights:
    """``default`` | ``random`` | a path."""
    if weights == "default":
        from models import hub

        if variant.weights is not None and hub.is_hub_url(variant.weights.url):
            return hub.load_hub_default(variant, progress=progress)
        return load_default(variant, progress=progress)
    if weights == "random":
        return Weights(None, f"random:seed={RANDOM_SEED}", None, pretrained=False)
    return load_local(Path(weights))


def build_model(variant: Variant, weights: Weights, num_classes: int | None = None) -> nn.Module:
    """The variant's module with ``weights`` loaded strictly, in eval mode."""
    # Seeding before construction makes "random" weights the same on every machine.
    torch.manual_seed(RANDOM_SEED)
    model: nn.Module = variant.build_fn()(num_classes=num_classes or variant.num_classes)
    if weights.state_dict is not None:
        try:
            model.load_state_dict(weights.state_dict, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"weights do not fit {variant.name}: {exc}") from None
    return model.eval()
