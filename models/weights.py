"""Where a model's weights come from: the catalog's URL, a local file, or a seed.

There is no silent fallback: a variant asked for with ``default`` weights either gets
exactly those (hash-checked) or the export stops with a message that says what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resnet_serve.models.catalog import Variant

RANDOM_SEED = 0
# .tar: timm's train.py names its checkpoints *.pth.tar.
LOCAL_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".tar", ".safetensors")
# Where training scripts keep the weights in a checkpoint: timm's train.py (state_dict,
# state_dict_ema) and torchvision's references/classification/train.py (model, model_ema).
MODEL_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema")
# The torch hub cache beside this checkout (``../shared/weights``): it holds some of the
# catalog's checkpoints (the CIFAR ResNet-20/32/44/56), not all of them.
SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


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


def unwrap_state_dict(obj: Any, ema: bool = False) -> dict[str, Tensor]:
    """A bare state dict, or one held under ``state_dict``/``model`` (with ``ema``:
    ``state_dict_ema``/``model_ema``), minus ``module.``."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    held = next(
        (k for k in (EMA_KEYS if ema else MODEL_KEYS) if isinstance(obj.get(k), Mapping)), None
    )
    if held is not None:
        obj = obj[held]
    elif ema:
        raise WeightsError(
            f"--ema: the checkpoint holds no EMA weights (no {' or '.join(EMA_KEYS)} entry; "
            f"it has {', '.join(sorted(map(str, obj))) or 'nothing'})"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsError("the checkpoint holds no tensors")
    # torchvision's EMA model is an AveragedModel: its counter sits beside module.<key>.
    if "n_averaged" in tensors and all(
        k.startswith("module.") for k in tensors if k != "n_averaged"
    ):
        del tensors["n_averaged"]
    # DataParallel/DDP checkpoints prefix every key; strip it only when all keys have it.
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _cache_path(variant: Variant) -> Path:
    assert variant.weights is not None
    return Path(torch.hub.get_dir()) / "checkpoints" / variant.weights.filename


def _shared_cache_hint(filename: str) -> str:
    """``TORCH_HOME=...`` for the shared cache, only where it holds this very file: for
    any other model the suggestion would only lead to the same error."""
    if not (SHARED_WEIGHTS / "hub" / "checkpoints" / filename).is_file():
        return ""
    relative = os.path.relpath(SHARED_WEIGHTS)
    shown = relative if len(relative) < len(str(SHARED_WEIGHTS)) else str(SHARED_WEIGHTS)
    return f"; this checkout's shared cache has it: run with TORCH_HOME={shown}"


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
            f"and no cached copy exists at {cached}{_shared_cache_hint(spec.filename)}. "
            f"Either place the file there (the cache follows TORCH_HOME), "
            f"or pass --weights PATH to a local .pth/.th/.safetensors file, "
            f"or --weights random for seeded random weights."
        ) from None
    except Exception as exc:  # torch.load's faults with a broken file: unpickling, EOF...
        raise WeightsError(
            f"default weights of {variant.name} failed to load from {cached} ({exc}): delete "
            "that file and retry, or pass --weights PATH"
        ) from None
    # torch.hub checks the hash only when it downloads; a cached file is checked here too.
    digest = sha256_file(cached)
    if not digest.startswith(spec.sha256_prefix):
        raise WeightsError(
            f"{cached} has sha256 {digest[:16]}..., expected a prefix of {spec.sha256_prefix}: "
            "the cached file is corrupt or not the published one; delete it and retry"
        )
    return Weights(unwrap_state_dict(obj), spec.url, digest, pretrained=True)


def load_local(path: Path, ema: bool = False) -> Weights:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise WeightsError(f"{path}: expected one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # Training checkpoints of timm and torchvision keep their argparse arguments.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's input, reported plainly
        raise WeightsError(f"cannot read weights from {path}: {exc}") from None
    # The source names the EMA entry, so model.json tells EMA and raw weights apart.
    # The file name only: the export machine's directories are nobody's business.
    source = f"{path.name}#ema" if ema else path.name
    return Weights(unwrap_state_dict(obj, ema), source, sha256_file(path), pretrained=True)


def resolve(variant: Variant, weights: str, progress: bool = False, ema: bool = False) -> Weights:
    """``default`` | ``random`` | a path (``ema``: a checkpoint's EMA weights)."""
    if ema and weights in ("default", "random"):
        raise WeightsError(f"EMA weights come from a checkpoint file, not from {weights!r}")
    if weights == "default":
        from resnet_serve.models import hub

        if variant.weights is not None and hub.is_hub_url(variant.weights.url):
            return hub.load_hub_default(variant, progress=progress)
        return load_default(variant, progress=progress)
    if weights == "random":
        return Weights(None, f"random:seed={RANDOM_SEED}", None, pretrained=False)
    return load_local(Path(weights), ema)


# The classifier's weight ``[classes, embedding(, 1, 1)]`` in each layout of the catalog:
# torchvision's ResNets (``fc``), the CIFAR nets' reference checkpoints (``linear``), timm's
# ResNetV2 (``head.fc``, a 1x1 convolution).
CLASSIFIER_KEYS = ("fc.weight", "linear.weight", "head.fc.weight")


def classifier_key(variant: Variant, weights: Weights | None = None) -> str:
    """The state-dict key of the classifier's weight: the one the checkpoint has, else the
    variant's family's usual one (for messages)."""
    if weights is not None and weights.state_dict is not None:
        for key in CLASSIFIER_KEYS:
            if key in weights.state_dict:
                return key
    return "linear.weight" if variant.family == "cifar" else "fc.weight"


def checkpoint_classes(variant: Variant, weights: Weights) -> int | None:
    """How many classes the checkpoint's classifier has; None for random weights, or a
    checkpoint without such a key (loading it then says what is wrong)."""
    if weights.state_dict is None:
        return None
    w = weights.state_dict.get(classifier_key(variant, weights))
    return int(w.shape[0]) if w is not None and w.ndim in (2, 4) else None


def class_labels(variant: Variant, weights: Weights, labels: list[str] | None) -> list[str]:
    """The class names to export: ``labels`` (as many as the checkpoint has classes),
    else the catalog's, else, for a checkpoint with another number of classes (fine-tuned
    on other data), their numbers "0", "1", ..."""
    n = checkpoint_classes(variant, weights)
    if labels is not None:
        if n is not None and len(labels) != n:
            raise WeightsError(
                f"--labels has {len(labels)} names, but the checkpoint's classifier "
                f"({classifier_key(variant, weights)}) has {n} classes: give one name per class"
            )
        return labels
    if n is None or n == variant.num_classes:
        return variant.labels()
    return [str(i) for i in range(n)]


def build_model(variant: Variant, weights: Weights, num_classes: int | None = None) -> nn.Module:
    """The variant's module with ``weights`` loaded strictly, in eval mode."""
    num_classes = num_classes or variant.num_classes
    found = checkpoint_classes(variant, weights)
    if found is not None and found != num_classes:
        # Said plainly: PyTorch's size-mismatch report is a page long.
        raise WeightsError(
            f"the checkpoint's classifier ({classifier_key(variant, weights)}) has {found} "
            f"classes, the model was asked for {num_classes}"
        )
    # Seeding before construction makes "random" weights the same on every machine.
    torch.manual_seed(RANDOM_SEED)
    model: nn.Module = variant.build_fn()(num_classes=num_classes)
    if weights.state_dict is not None:
        try:
            model.load_state_dict(weights.state_dict, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"weights do not fit {variant.name}: {exc}") from None
    return model.eval()
