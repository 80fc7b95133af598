"""Export a variant to ONNX with preprocessing inside the graph, verify it, and write it
to the model repository (``<repository>/<name>/model.onnx`` + ``model.json``).

The graph takes ``images``: uint8 ``[N, H, W, 3]`` RGB, already resized and cropped, and
returns ``logits`` ``[N, num_classes]`` and ``embedding`` ``[N, D]`` (float32), plus, with
``features``, the maps of those backbone stages, ``[N, C, H, W]``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from resnet_serve.contract import schema, selfcheck
from resnet_serve.models.catalog import Preprocess, Variant
from resnet_serve.models.weights import Weights, build_model, class_labels, sha256_file

DEFAULT_OPSET = 18
# Max error relative to the largest |value| of PyTorch's output, per output tensor.
DEFAULT_TOLERANCE = 1e-4
PARITY_BATCH = 3


class ExportError(Exception):
    """The export or its verification failed; the message says how."""


class ServingGraph(nn.Module):
    """uint8 NHWC in; (logits, embedding, *stage maps) out. Normalisation is folded into
    one affine."""

    def __init__(
        self, model: nn.Module, preprocess: Preprocess, features: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.model = model
        unknown = [f for f in features if f not in model.stage_names]
        if unknown:
            raise ExportError(
                f"no stage {', '.join(unknown)}; this model has {', '.join(model.stage_names)}"
            )
        # In the backbone's order, whatever order they were asked in.
        self.features = tuple(f for f in model.stage_names if f in features)
        mean = torch.tensor(preprocess.mean, dtype=torch.float32)
        std = torch.tensor(preprocess.std, dtype=torch.float32)
        # (x / 255 - mean) / std == x * scale + shift, one Mul and one Add in the graph.
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1))

    @property
    def output_names(self) -> list[str]:
        return ["logits", "embedding", *self.features]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        embedding, maps = self.model.forward_stages(x, self.features)
        return (self.model.forward_head(embedding), embedding, *maps)

    def feature_specs(self, crop: int) -> list[dict[str, Any]]:
        """Channels, stride and shape of each exported stage, measured, not assumed."""
        with torch.no_grad():
            outs = self(torch.zeros(1, crop, crop, 3, dtype=torch.uint8))[2:]
        return [
            {"name": name, "channels": int(t.shape[1]), "stride": crop // int(t.shape[2]),
             "shape": [-1, *map(int, t.shape[1:])]}
            for name, t in zip(self.features, outs, strict=True)
        ]  # fmt: skip


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    """Max absolute error relative to the largest |value| of ``expected``."""
    err = float(np.max(np.abs(got.astype(np.float64) - expected)))
    return err / max(float(np.max(np.abs(expected))), 1e-12)


@dataclass(frozen=True)
class Parity:
    max_abs_err: float
    max_rel_err: dict[str, float]


def export_onnx(graph: ServingGraph, crop: int, path: Path, opset: int = DEFAULT_OPSET) -> None:
    dummy = torch.zeros(2, crop, crop, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (dummy,),
            input_names=["images"],
            output_names=graph.output_names,
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        # torch's dynamo exporter writes its own opset and converts only where it can; a
        # model.json recording the requested one would say what the graph is not.
        raise ExportError(
            f"opset {opset} was asked for, torch {torch.__version__} wrote opset {written}: "
            f"leave --opset out (default {DEFAULT_OPSET}) or give {written}"
        )
    # Readable dimension names for tools like Netron and for the runtime's checks.
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for out in model.graph.output:
        out.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def check_parity(
    graph: ServingGraph, path: Path, crop: int, tolerance: float, batch: int = PARITY_BATCH
) -> Parity:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, crop, crop, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = [t.numpy() for t in graph(torch.from_numpy(images))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(graph.output_names, {"images": images})
    abs_err = 0.0
    rel: dict[str, float] = {}
    for name, e, g in zip(graph.output_names, expected, got, strict=True):
        if g.shape != e.shape:
            raise ExportError(f"{name}: ONNX shape {g.shape} != PyTorch shape {e.shape}")
        abs_err = max(abs_err, float(np.max(np.abs(g.astype(np.float64) - e))))
        rel[name] = relative_error(e, g)
    worst = max(rel.values())
    if not np.isfinite(worst) or worst > tolerance:
        raise ExportError(
            f"ONNX output differs from PyTorch: relative error {worst:.3g} > "
            f"tolerance {tolerance:g} "
            f"({', '.join(f'{k} {v:.3g}' for k, v in rel.items())})"
        )
    return Parity(abs_err, rel)


def _logits(path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [
        session.run(["logits"], {"images": images[i : i + batch]})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(parts)


def record_self_check(
    directory: Path,
    fp32_path: Path,
    model_path: Path,
    precision: str,
    crop: int,
    calibration: np.ndarray | None,
) -> dict[str, Any]:
    """The reference set the runtime checks the model against on the serving CPU
    (contract.selfcheck): the first calibration images (int8), or synthetic ones, with the
    fp32 graph's logits and what this graph measured against them here."""
    if calibration is not None and len(calibration) >= selfcheck.REFERENCE_IMAGES:
        images, source = calibration[: selfcheck.REFERENCE_IMAGES], "calibration"
    else:
        images, source = selfcheck.synthetic_images(selfcheck.REFERENCE_IMAGES, crop), "synthetic"
    reference = _logits(fp32_path, images)
    got = reference if model_path == fp32_path else _logits(model_path, images)
    return selfcheck.record(directory, images, reference, got, precision=precision, source=source)


def model_json(
    *,
    name: str,
    variant: Variant,
    labels: list[str],
    embedding_dim: int,
    weights: Weights,
    opset: int,
    parity: Parity,
    tolerance: float,
    onnx_sha256: str,
    precision: str = "fp32",
    lowered: dict[str, Any] | None = None,
    features: list[dict[str, Any]] | None = None,
    self_check: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``lowered``: what an int8/fp16 conversion adds (see models.quantize); ``parity_*``
    always describe the fp32 graph against PyTorch, before any conversion."""
    exporter = {"torch": torch.__version__, "onnx": onnx.__version__}
    if lowered:
        import onnxruntime

        exporter["onnxruntime"] = onnxruntime.__version__
    return schema.document(
        name=name,
        labels=labels,
        embedding_dim=embedding_dim,
        preprocess=variant.preprocess,
        features=[schema.FeatureSpec.from_json(f) for f in features or []],
        arch=variant.name,
        family=variant.family,
        dataset=variant.dataset,
        precision=precision,
        weights=weights.to_json(),
        opset=opset,
        parity_max_abs_err=parity.max_abs_err,
        parity_max_rel_err=parity.max_rel_err,
        parity_tolerance=tolerance,
        **(lowered or {}),
        **({"self_check": self_check} if self_check else {}),
        onnx_sha256=onnx_sha256,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        exporter=exporter,
    )


def export_variant(
    variant: Variant,
    weights: Weights,
    repository: Path,
    *,
    name: str | None = None,
    labels: list[str] | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    precision: str = "fp32",
    calibration: Path | None = None,
    calibration_limit: int | None = None,
    calibration_method: str | None = None,
    min_agreement: float | None = None,
    int8_weight_bits: int | None = None,
    features: tuple[str, ...] = (),
) -> Path:
    """Build, export, verify and publish one model; returns its directory.

    ``precision`` int8 or fp16 converts the verified fp32 graph (models.quantize) and
    names the model ``<variant>_<precision>`` unless ``name`` is given; int8 is
    calibrated on the images of ``calibration`` (a directory or an .npz).
    """
    # A suffix keeps an int8/fp16 export from replacing the fp32 model of the same variant.
    name = name or (variant.name if precision == "fp32" else f"{variant.name}_{precision}")
    if name in (".", "..") or Path(name).name != name:
        # The folder an export replaces must be one of the repository's own.
        raise ExportError(f"model name {name!r} is not a folder name")
    labels = class_labels(variant, weights, labels)
    if not labels:
        raise ExportError("no class labels: the model.json would not match the graph's logits")
    calib = None
    if precision != "fp32":
        # Imported only here: the fp32 path needs neither the quantizer nor the runtime code.
        from resnet_serve.models import quantize

        # Read before the export, so that a bad image fails in seconds, not minutes.
        calib = quantize.prepare(
            precision, calibration, variant.preprocess, calibration_limit, calibration_method
        )
    model = build_model(variant, weights, num_classes=len(labels))
    graph = ServingGraph(model, variant.preprocess, features).eval()
    crop = variant.preprocess.crop
    repository.mkdir(parents=True, exist_ok=True)
    # Build in a sibling directory and rename into place, so a server reading the
    # repository never sees a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        onnx_path = staging / "model.onnx"
        fp32_path = onnx_path if precision == "fp32" else staging / "fp32.onnx"
        export_onnx(graph, crop, fp32_path, opset)
        parity = check_parity(graph, fp32_path, crop, tolerance)
        lowered = None
        if precision != "fp32":
            lowered = quantize.lower_precision(
                fp32_path,
                onnx_path,
                precision,
                variant.preprocess,
                calibration=calib,
                method=calibration_method,
                min_agreement=min_agreement,
                int8_weight_bits=int8_weight_bits,
            )
        self_check = record_self_check(
            staging, fp32_path, onnx_path, precision, crop, calib.images if calib else None
        )
        if fp32_path != onnx_path:
            fp32_path.unlink()
        meta = model_json(
            name=name,
            variant=variant,
            labels=labels,
            embedding_dim=int(model.embedding_dim),
            weights=weights,
            opset=opset,
            parity=parity,
            tolerance=tolerance,
            onnx_sha256=sha256_file(onnx_path),
            precision=precision,
            lowered=lowered,
            features=graph.feature_specs(crop),
            self_check=self_check,
        )
        (staging / schema.METADATA_FILE).write_text(
            json.dumps(meta, indent=2) + "\n", encoding="utf-8"
        )
        os.chmod(staging, 0o755)
        target = repository / name
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
