"""``model.json``: the one owner of the model repository's metadata format.

The build step writes with it (``document``), the runtime reads with it
(``load_model_spec``); neither restates a field, an output name or a list of choices.
Nothing here imports torch, onnxruntime or the web stack.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
MODEL_FILE = "model.onnx"
METADATA_FILE = "model.json"

# The graph's one input (uint8 NHWC RGB, preprocessing up to the crop done outside it).
INPUT = "images"
# The graph's outputs every model has; stage maps (``features``) come after them.
LOGITS = "logits"
EMBEDDING = "embedding"
GRAPH_OUTPUTS = (LOGITS, EMBEDDING)
# Derived by the runtime from the logits, not a graph output.
PROBABILITIES = "probabilities"
VECTOR_OUTPUTS = (LOGITS, PROBABILITIES, EMBEDDING)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
POOLS = ("avg", "max", "gem", "none")
# Pillow's format names for the encoded images the runtime may accept.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RepositoryError(Exception):
    """A model directory that cannot be served; the message names the file and the fault."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What happens before the graph: resize the shorter side, center-crop. ``mean`` and
    ``std`` are applied inside the graph; they are recorded so that users and other
    runtimes can reproduce the model's input exactly."""

    resize: int
    crop: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop} resize={self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} not in {INTERPOLATIONS}")

    @classmethod
    def from_crop_pct(
        cls,
        crop: int,
        crop_pct: float,
        interpolation: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> PreprocessSpec:
        """timm's eval transform: the shorter side resized to ``floor(crop / crop_pct)``."""
        return cls(math.floor(crop / crop_pct), crop, mean, std, interpolation)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PreprocessSpec:
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class FeatureSpec:
    """A backbone stage exported as an extra output: ``[N, channels, H, W]`` float32."""

    name: str
    channels: int
    stride: int
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(str(d["name"]), int(d["channels"]), int(d["stride"]), tuple(d["shape"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "channels": self.channels,
            "stride": self.stride,
            "shape": list(self.shape),
        }


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    num_classes: int
    labels: tuple[str, ...]
    embedding_dim: int
    preprocess: PreprocessSpec
    metadata: dict[str, Any] = field(repr=False, compare=False)
    features: dict[str, FeatureSpec] = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.preprocess.crop, self.preprocess.crop, 3)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph's outputs."""
        return (*GRAPH_OUTPUTS, *self.features)

    def output_shape(self, name: str) -> tuple[int, ...]:
        """One image's shape of a graph or derived output."""
        if name in (LOGITS, PROBABILITIES):
            return (self.num_classes,)
        if name == EMBEDDING:
            return (self.embedding_dim,)
        return tuple(self.features[name].shape[1:])

    def summary(self) -> dict[str, Any]:
        """The metadata without the label list, for listings."""
        return {k: v for k, v in self.metadata.items() if k != "labels"}


def document(
    *,
    name: str,
    labels: list[str],
    embedding_dim: int,
    preprocess: PreprocessSpec,
    features: list[FeatureSpec] = (),  # type: ignore[assignment]
    **extra: Any,
) -> dict[str, Any]:
    """A model.json: the contract's fields, then ``extra`` (provenance: arch, weights,
    parity, precision, ...), which the runtime shows but does not interpret."""
    crop = preprocess.crop
    specs = [f.to_json() for f in features]
    contract: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "num_classes": len(labels),
        "labels": list(labels),
        "embedding_dim": embedding_dim,
        "input": {"name": INPUT, "dtype": "uint8", "layout": "NHWC", "shape": [-1, crop, crop, 3]},
        "outputs": {
            LOGITS: {"dtype": "float32", "shape": [-1, len(labels)]},
            EMBEDDING: {"dtype": "float32", "shape": [-1, embedding_dim]},
            **{f["name"]: {"dtype": "float32", "shape": f["shape"]} for f in specs},
        },
        "features": specs,
        "preprocess": preprocess.to_json(),
    }
    # The contract's fields first (a reader sees them at the top), never overridden.
    return {**contract, **{k: v for k, v in extra.items() if k not in contract}}


def _file_name_only(meta: dict[str, Any]) -> dict[str, Any]:
    """``weights.source`` and ``calibration.source`` without the export machine's
    directories: older exports wrote the absolute path of a local checkpoint or calibration
    set, which ``/v1/models`` would publish. URLs and ``random:...`` are kept as they are."""
    out = dict(meta)
    for block in ("weights", "calibration"):
        fields = meta.get(block)
        if not isinstance(fields, dict) or not isinstance(fields.get("source"), str):
            continue
        source: str = fields["source"]
        if "://" in source or source.startswith("random:"):
            continue
        name = source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        out[block] = {**fields, "source": name}
    return out


def load_model_spec(model_dir: Path) -> ModelSpec:
    meta_path = model_dir / METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryError(f"{meta_path} is missing") from None
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{meta_path} is not readable JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise RepositoryError(f"{meta_path}: invalid model.json (not a JSON object)")
    meta = _file_name_only(meta)
    if not (model_dir / MODEL_FILE).is_file():
        raise RepositoryError(f"{model_dir / MODEL_FILE} is missing")
    try:
        version = meta.get("format_version", 1)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(f"format_version {version} is not supported")
        labels = tuple(str(x) for x in meta["labels"])
        if len(labels) != int(meta["num_classes"]):
            raise ValueError(f"{len(labels)} labels for num_classes={meta['num_classes']}")
        return ModelSpec(
            name=str(meta.get("name", model_dir.name)),
            path=model_dir,
            num_classes=int(meta["num_classes"]),
            labels=labels,
            embedding_dim=int(meta["embedding_dim"]),
            preprocess=PreprocessSpec.from_json(meta["preprocess"]),
            metadata=meta,
            features={f["name"]: FeatureSpec.from_json(f) for f in meta.get("features", [])},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field of a wrong type
        raise RepositoryError(f"{meta_path}: invalid model.json ({exc!r})") from None
