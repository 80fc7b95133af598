"""The int8 format comparison of docs/precision.md ("int8 on every x86 CPU").

    # 1. export fp32 + every candidate format (CIFAR nets with real weights; ResNet-50 random)
    TORCH_HOME=../shared/weights python tools/int8_formats.py build /tmp/fmt
    # 2. accuracy on the 846 test images, natively and on an emulated AVX2-only CPU (Zen 3)
    python tools/int8_formats.py accuracy /tmp/fmt
    python tools/int8_formats.py accuracy /tmp/fmt --emulate EPYC-Milan   # needs qemu-user
    # 3. ResNet-50 speed of each format against fp32 (real hardware only)
    python tools/int8_formats.py speed /tmp/fmt

Candidates: QDQ and QOperator, U8S8 with 8- and 7-bit (``reduce_range``) weights, S8S8,
U8U8, all per-channel, calibrated with the exporter's defaults (percentile on the 932
training images; ResNet-50 minmax on 16, which is meaningful for speed only).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("RESNET_SERVE_SHARED", ROOT.parent / "shared"))
CIFAR = ("resnet20_cifar10", "resnet56_cifar10")
# name: (QDQ?, activations signed?, weights signed?, reduce_range)
FORMATS = {
    "qdq_u8s8": (True, False, True, False),
    "qdq_u8s8_7bit": (True, False, True, True),
    "qdq_s8s8": (True, True, True, False),
    "qdq_u8u8": (True, False, False, False),
    "qop_u8s8": (False, False, True, False),
    "qop_u8s8_7bit": (False, False, True, True),
    "qop_s8s8": (False, True, True, False),
}


def build(out: Path, formats: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from resnet_serve.models import quantize as q
    from resnet_serve.models.catalog import get_variant
    from resnet_serve.models.export import export_variant
    from resnet_serve.models.weights import resolve

    for name in (*CIFAR, "resnet50"):
        variant = get_variant(name)
        cifar = name in CIFAR
        fp32 = export_variant(variant, resolve(variant, "default" if cifar else "random"),
                              out / "fp32")  # fmt: skip
        calib = q.load_calibration(
            SHARED / "data" / "cifar10-train-932.npz", variant.preprocess,
            limit=None if cifar else 16,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(fp32 / "model.onnx"), str(prepared))
            for fmt in formats:
                qdq, s_act, s_w, reduce = FORMATS[fmt]
                dst = out / fmt / name
                dst.mkdir(parents=True, exist_ok=True)
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(
                        str(prepared), str(dst / "model.onnx"),
                        q._BatchReader(calib.images, q.CALIBRATION_BATCH),
                        quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
                        per_channel=True, reduce_range=reduce,
                        activation_type=QuantType.QInt8 if s_act else QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if s_w else QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.Percentile if cifar
                        else CalibrationMethod.MinMax,
                        extra_options={"CalibStridedMinMax": 1, "CalibPercentile": q.PERCENTILE},
                    )  # fmt: skip
                print(f"{name} {fmt}: {dst}", flush=True)


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [s.run(["logits"], {"images": images[i : i + 128]})[0] for i in range(0, len(images), 128)]
    )


def accuracy(root: Path, formats: list[str], emulate: str | None) -> None:
    if emulate:
        argv = [sys.argv[0], "accuracy", str(root), "--formats", ",".join(formats)]
        cmd = ["qemu-x86_64", "-cpu", emulate, sys.executable, *argv]
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        return
    from resnet_serve.contract.selfcheck import cpu_description, logits_error

    with np.load(SHARED / "data" / "cifar10-test-846.npz") as d:
        images, labels = d["images"], d["labels"]
    print(f"CPU: {cpu_description()}")
    print("| model | format | top-1 | agreement with fp32 | logits RMS rel. err. |")
    print("|---|---|---:|---:|---:|")
    for name in CIFAR:
        ref = _logits(root / "fp32" / name / "model.onnx", images)
        print(f"| {name} | fp32 | {np.mean(ref.argmax(1) == labels):.4f} | - | - |", flush=True)
        for fmt in formats:
            got = _logits(root / fmt / name / "model.onnx", images)
            agreement, rms = logits_error(ref, got)
            top1 = np.mean(got.argmax(1) == labels)
            print(f"| {name} | {fmt} | {top1:.4f} | {agreement:.4f} | {rms:.4f} |", flush=True)


def speed(root: Path, formats: list[str], batches: list[int], rounds: int, seconds: float) -> None:
    import onnxruntime as ort

    from resnet_serve.contract.selfcheck import cpu_description

    names = ["fp32", *formats]
    sessions = {}
    for n in names:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[n] = ort.InferenceSession(
            str(root / n / "resnet50" / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
    print(f"CPU: {cpu_description()}")
    print("| format | batch | images/s (median) | vs fp32 |")
    print("|---|---:|---:|---:|")
    for b in batches:
        x = np.random.default_rng(0).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
        rates: dict[str, list[float]] = {n: [] for n in names}
        for n in names:
            sessions[n].run(["logits"], {"images": x})
        # In turns, so that other load on the machine slows every format alike.
        for _ in range(rounds):
            for n in names:
                t, done = time.perf_counter(), 0
                while time.perf_counter() - t < seconds:
                    sessions[n].run(["logits"], {"images": x})
                    done += b
                rates[n].append(done / (time.perf_counter() - t))
        base = statistics.median(rates["fp32"])
        for n in names:
            m = statistics.median(rates[n])
            print(f"| {n} | {b} | {m:.1f} | {m / base:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=("build", "accuracy", "speed"))
    p.add_argument("directory", type=Path)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--emulate", metavar="QEMU_CPU", help="accuracy on an emulated CPU model")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5)
    args = p.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    if args.command == "build":
        build(args.directory, formats)
    elif args.command == "accuracy":
        accuracy(args.directory, formats, args.emulate)
    else:
        batches = [int(b) for b in args.batches.split(",")]
        speed(args.directory, formats, batches, args.rounds, args.seconds)


if __name__ == "__main__":
    main()
