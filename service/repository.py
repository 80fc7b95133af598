"""Reading the model repository: ``<repository>/<name>/model.onnx`` + ``model.json``.

This is the runtime's only view of a model; everything about its input comes from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import InvalidParameterError

SUPPORTED_FORMAT_VERSIONS = {1}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


class RepositoryError(Exception):
    """A model directory that cannot be served; the message names the file and the fault."""


@dataclass(frozen=True)
class PreprocessSpec:
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PreprocessSpec:
        spec = cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
        )
        if not 0 < spec.crop <= spec.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={spec.crop} resize={spec.resize}")
        if spec.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {spec.interpolation!r} not in {INTERPOLATIONS}")
        return spec


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
        return self.path / "model.onnx"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.preprocess.crop, self.preprocess.crop, 3)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits", "embedding", *self.features)

    def check_outputs(self, names: tuple[str, ...]) -> None:
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise InvalidParameterError(
                f"model {self.name} has no output {', '.join(unknown)} "
                f"(outputs: {', '.join(self.output_names)})"
            )

    def summary(self) -> dict[str, Any]:
        """The metadata without the label list, for listings."""
        return {k: v for k, v in self.metadata.items() if k != "labels"}


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
        out[block] = {**fields, "source": source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]}
    return out


def load_model_spec(model_dir: Path) -> ModelSpec:
    meta_path = model_dir / "model.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryError(f"{meta_path} is missing") from None
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{meta_path} is not readable JSON: {exc}") from None
    meta = _file_name_only(meta)
    if not (model_dir / "model.onnx").is_file():
        raise RepositoryError(f"{model_dir / 'model.onnx'} is missing")
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
    except (KeyError, TypeError, ValueError) as exc:
        raise RepositoryError(f"{meta_path}: invalid model.json ({exc!r})") from None


def discover(repository: Path, names: list[str] | None = None) -> list[ModelSpec]:
    """The models of ``repository`` (sorted by name), or exactly ``names`` in that order."""
    if not repository.is_dir():
        raise RepositoryError(
            f"model repository {repository} does not exist (create it and its models with "
            f"resnet-export, e.g. resnet-export resnet50 --repository {repository})"
        )
    if names:
        missing = [n for n in names if not (repository / n).is_dir()]
        if missing:
            available = sorted(p.name for p in repository.iterdir() if (p / "model.json").exists())
            raise RepositoryError(
                f"models not in {repository}: {', '.join(missing)} "
                f"(available: {', '.join(available) or 'none'})"
            )
        dirs = [repository / n for n in names]
    else:
        dirs = sorted(p for p in repository.iterdir() if (p / "model.json").is_file())
        if not dirs:
            raise RepositoryError(
                f"no models in {repository} (expected <name>/model.onnx + model.json; "
                "create them with resnet-export)"
            )
    return [load_model_spec(d) for d in dirs]
