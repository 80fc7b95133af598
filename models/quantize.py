"""Lower-precision graphs made from the verified fp32 export: int8 and fp16.

Both keep the fp32 graph's serving contract exactly (uint8 ``images`` ``[N, H, W, 3]`` in,
float32 ``logits`` and ``embedding`` out, dynamic batch), so the runtime serves them
unchanged. Neither can match PyTorch to the fp32 tolerance, so each is checked against
the fp32 ONNX graph it was made from instead (see ``PrecisionCheck`` and docs/precision.md).

- int8: onnxruntime static quantization, QDQ format, uint8 activations and per-channel
  int8 weights (U8S8) in 7 bits by default, calibrated on images that went through the
  runtime's own resize and crop (``contract.preprocess``), so the ranges describe what the
  server will feed. 7-bit weights keep the int16 sums of AVX2's ``vpmaddubsw`` from
  saturating, so one file computes the same on AVX2, AVX-512 VNNI and AMX CPUs (measured
  in docs/precision.md); 8-bit weights are for CPUs known to have VNNI.
- fp16: every float tensor but the graph outputs converted to float16. Meant for the
  CUDA provider; the CPU provider runs it, slower than fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from resnet_serve.contract.preprocess import DecodeOptions, ImageError, preprocess_array
from resnet_serve.contract.preprocess import preprocess as preprocess_bytes
from resnet_serve.models.catalog import Preprocess
from resnet_serve.models.export import ExportError, relative_error

PRECISIONS = ("fp32", "int8", "fp16")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Weight bits: 7 (onnxruntime's reduce_range) is exact wherever the model is served; 8 is
# marginally closer to fp32 but only on CPUs with VNNI/AMX (docs/precision.md).
INT8_WEIGHT_BITS = (7, 8)
DEFAULT_INT8_WEIGHT_BITS = 7
# Percentile held accuracy best of the three on the CIFAR ResNets (docs/precision.md).
DEFAULT_CALIBRATION_METHOD = "percentile"
PERCENTILE = 99.999
# Images per calibration run. The histogram methods hold every calibrated activation of a
# batch at once; with 8 a ResNet-50 (224 px) int8 export peaks at 2-3 GB of memory.
CALIBRATION_BATCH = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# int8 must pick the fp32 graph's class on at least this share of the calibration images.
# Measured agreement is >= 0.99 on the CIFAR ResNets; a broken calibration lands far below.
DEFAULT_MIN_AGREEMENT = 0.95
# fp16 against fp32, relative to the largest |output|: measured < 1e-3 on the CIFAR ResNets.
FP16_TOLERANCE = 1e-2
FP16_CHECK_IMAGES = 8
CHECK_BATCH = 64
OUTPUTS = ("logits", "embedding")
MISSING_CALIBRATION = (
    "int8 needs calibration images: --calibration DIR_or_NPZ, a directory of image files or "
    "an .npz with an 'images' uint8 [N, H, W, 3] array (a few hundred representative images)"
)


class CalibrationError(ExportError):
    """Calibration images that cannot be used; the message names the file and the fault."""


@dataclass(frozen=True)
class Calibration:
    """Calibration images exactly as the graph receives them from the runtime."""

    images: np.ndarray  # uint8 [N, crop, crop, 3]
    source: str

    @property
    def sha256(self) -> str:
        """Hash of the preprocessed tensor's bytes (C order), to tell calibration sets apart."""
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()


@dataclass(frozen=True)
class PrecisionCheck:
    """A lowered graph against the fp32 graph it was made from, on the same images."""

    images: str
    count: int
    top1_agreement: float
    max_rel_err: dict[str, float]

    def to_json(self, criterion: str) -> dict[str, Any]:
        return {
            "reference": "fp32 ONNX graph",
            "images": self.images,
            "count": self.count,
            "top1_agreement": self.top1_agreement,
            "max_rel_err": self.max_rel_err,
            "criterion": criterion,
        }


def _npz_images(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise CalibrationError(
                    f"{path}: no 'images' array (has: {', '.join(data.files) or 'nothing'})"
                )
            images = data["images"]
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CalibrationError(
            f"{path}: 'images' must be uint8 [N, H, W, 3] RGB, got {images.dtype} "
            f"{list(images.shape)}"
        )
    return images


def _image_files(path: Path) -> list[Path]:
    # Sorted, so that --calibration-limit and the recorded hash do not depend on the file system.
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_calibration(source: Path, preprocess: Preprocess, limit: int | None = None) -> Calibration:
    """Images from an .npz (``images`` uint8 ``[N, H, W, 3]``) or a directory of image files,
    resized and cropped by the runtime's own code; the first ``limit`` if given."""
    spec = preprocess
    if source.is_dir():
        files = _image_files(source)[:limit]
        if not files:
            raise CalibrationError(
                f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory"
            )
        options = DecodeOptions()
        out = []
        for i, f in enumerate(files):
            try:
                out.append(preprocess_bytes(f.read_bytes(), i, spec, options))
            except ImageError as exc:
                raise CalibrationError(f"calibration file {f}: {exc.message}") from None
    elif source.is_file():
        arrays = _npz_images(source)[:limit]
        if len(arrays) == 0:
            raise CalibrationError(f"{source}: 'images' holds no images")
        out = [preprocess_array(a, spec) for a in arrays]
    else:
        raise CalibrationError(f"calibration source not found: {source}")
    # The name alone: model.json is served, and the export machine's paths are not public.
    return Calibration(np.stack(out), source.resolve().name)


class _BatchReader(CalibrationDataReader):
    """Feeds the calibration in batches; one range of ``set_range`` is a range of batches.

    The quantizer calls ``collect_data`` once per range when ``CalibStridedMinMax`` is set.
    One batch per call keeps memory bounded, and gives the histogram collectors, which
    stack what one call sees, batches of one shape even when the last batch is short.
    """

    def __init__(self, images: np.ndarray, batch: int) -> None:
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {"images": batch}


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: Calibration,
    method: str,
    weight_bits: int = DEFAULT_INT8_WEIGHT_BITS,
) -> None:
    """Static U8S8 per-channel QDQ quantization of ``fp32_path`` into ``out_path``."""
    if weight_bits not in INT8_WEIGHT_BITS:
        raise ExportError(f"int8 weight bits must be one of {INT8_WEIGHT_BITS}, not {weight_bits}")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory(prefix="resnet-quant.") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference gives the quantizer every tensor's type; without it some are skipped.
        quant_pre_process(str(fp32_path), str(prepared))
        # The calibrators print progress to stdout, which the CLI keeps for its results.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared),
                str(out_path),
                _BatchReader(calibration.images, CALIBRATION_BATCH),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                # Without VNNI, u8 x s8 pairs are summed in int16 (vpmaddubsw): 255 x 127 x 2
                # overflows it, 255 x 64 x 2 does not. VNNI and AMX sum in int32 either way.
                reduce_range=weight_bits == 7,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={"CalibStridedMinMax": 1, "CalibPercentile": PERCENTILE},
            )


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """Everything float in float16, except the float32 graph outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types adds the Casts back to float32 before the outputs; the uint8 input is
    # not a float, and the Cast that follows it is retargeted to float16.
    half = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(half, str(out_path))


def run_graph(path: Path, images: np.ndarray, batch: int = CHECK_BATCH) -> dict[str, np.ndarray]:
    """``logits`` and ``embedding`` of ``images`` on the CPU provider, in batches."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [
        session.run(list(OUTPUTS), {"images": images[i : i + batch]})
        for i in range(0, len(images), batch)
    ]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUTS)}


def compare(reference: Path, candidate: Path, images: np.ndarray, label: str) -> PrecisionCheck:
    ref = run_graph(reference, images)
    got = run_graph(candidate, images)
    agreement = float(np.mean(ref["logits"].argmax(1) == got["logits"].argmax(1)))
    rel = {name: relative_error(ref[name], got[name]) for name in OUTPUTS}
    return PrecisionCheck(label, len(images), agreement, rel)


def _io_signature(path: Path) -> list[tuple[str, int, list[int | str]]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        (
            v.name,
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in (*graph.input, *graph.output)
    ]


def _check_graph(reference: Path, candidate: Path) -> None:
    """A valid graph whose inputs and outputs are exactly the fp32 graph's."""
    onnx.checker.check_model(str(candidate), full_check=True)
    want, got = _io_signature(reference), _io_signature(candidate)
    if want != got:
        raise ExportError(f"the converted graph's inputs/outputs changed: {got} != {want}")


def prepare(
    precision: str,
    source: Path | None,
    preprocess: Preprocess,
    limit: int | None = None,
    method: str | None = None,
) -> Calibration | None:
    """Check the arguments of a conversion and read its calibration images, if any."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if method is not None and method not in CALIBRATION_METHODS:
        raise ExportError(
            f"unknown calibration method {method!r}; one of {', '.join(CALIBRATION_METHODS)}"
        )
    if precision == "int8" and source is None:
        raise CalibrationError(MISSING_CALIBRATION)
    if precision != "int8" and source is not None:
        raise CalibrationError("calibration images are used by int8 only")
    return None if source is None else load_calibration(source, preprocess, limit)


def lower_precision(
    fp32_path: Path,
    out_path: Path,
    precision: str,
    preprocess: Preprocess,
    *,
    calibration: Calibration | None = None,
    method: str | None = None,
    min_agreement: float | None = None,
    int8_weight_bits: int | None = None,
) -> dict[str, Any]:
    """Write the ``precision`` graph of ``fp32_path`` to ``out_path``, check it against the
    fp32 graph, and return the fields it adds to model.json."""
    if precision == "int8":
        if calibration is None:
            raise CalibrationError(MISSING_CALIBRATION)
        method = method or DEFAULT_CALIBRATION_METHOD
        min_agreement = DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement
        bits = int8_weight_bits or DEFAULT_INT8_WEIGHT_BITS
        quantize_int8(fp32_path, out_path, calibration, method, bits)
        _check_graph(fp32_path, out_path)
        check = compare(fp32_path, out_path, calibration.images, "calibration")
        criterion = f"top1_agreement >= {min_agreement:g}"
        if not check.top1_agreement >= min_agreement:
            raise ExportError(
                f"int8 graph agrees with fp32 on top-1 for {check.top1_agreement:.1%} of the "
                f"{check.count} calibration images, below the minimum {min_agreement:.1%}"
            )
        return {
            "calibration": {
                "source": calibration.source,
                "images": len(calibration.images),
                "sha256": calibration.sha256,
                "method": method,
            },
            "quantization": {
                "format": "QDQ",
                "activations": "uint8",
                "weights": "int8",
                "per_channel": True,
                "weight_bits": bits,
                "reduce_range": bits == 7,
                "cpus": "any x86-64 (AVX2, AVX-512, VNNI, AMX)"
                if bits == 7
                else "VNNI or AMX only: saturates on AVX2 without VNNI",
            },
            "precision_check": check.to_json(criterion),
        }
    if precision == "fp16":
        convert_fp16(fp32_path, out_path)
        _check_graph(fp32_path, out_path)
        crop = preprocess.crop
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(FP16_CHECK_IMAGES, crop, crop, 3), dtype=np.uint8)
        check = compare(fp32_path, out_path, images, "random")
        worst = max(check.max_rel_err.values())
        if not worst <= FP16_TOLERANCE:
            raise ExportError(
                f"fp16 output differs from fp32: relative error {worst:.3g} > {FP16_TOLERANCE:g}"
            )
        return {"precision_check": check.to_json(f"max_rel_err <= {FP16_TOLERANCE:g}")}
    raise ExportError(f"no conversion to {precision!r}; one of int8, fp16")
