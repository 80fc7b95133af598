"""Measure fp32 vs int8 vs fp16: the figures of docs/precision.md, printed as markdown.

Accuracy: the CIFAR-10 ResNets with their real weights, exported and converted by the
build step's own code, int8 calibrated on the 932 training images of ../shared with each
calibration method, all evaluated through onnxruntime on the 846 test images.
Speed: a ResNet-50 with random weights (its accuracy cannot be measured here), int8
calibrated on CIFAR training images upscaled by the runtime's preprocessing, timed with
a bare onnxruntime session at batch 1 and 8.

    TORCH_HOME=../shared/weights python tools/eval_precision.py > /tmp/precision.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnet_serve.models import quantize  # noqa: E402
from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.export import export_variant, relative_error  # noqa: E402
from resnet_serve.models.weights import resolve  # noqa: E402

SHARED = Path(os.environ.get("RESNET_SERVE_SHARED", ROOT.parent / "shared"))
CIFAR_TRAIN = SHARED / "data" / "cifar10-train-932.npz"
CIFAR_TEST = SHARED / "data" / "cifar10-test-846.npz"
CIFAR_MODELS = ["resnet20_cifar10", "resnet32_cifar10", "resnet44_cifar10", "resnet56_cifar10"]


def machine() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M) or ["", ""])[1].split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_fp16"]
    return [
        f"- CPU: {model[1] if model else platform.processor()}, {os.cpu_count()} logical CPUs",
        "- ISA flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted),
        f"- onnxruntime {ort.__version__}, CPUExecutionProvider, default session options",
    ]


def accuracy(models: list[str], methods: list[str], work: Path) -> list[str]:
    with np.load(CIFAR_TEST) as d:
        images, labels = d["images"], d["labels"]
    rows = [
        "| model | precision | calibration | top-1 | Δ top-1 vs fp32 (points) "
        "| top-1 agreement with fp32 | logits RMS rel. err. | logits max rel. err. |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        variant = get_variant(name)
        fp32_dir = export_variant(variant, resolve(variant, "default"), work)
        fp32_path = fp32_dir / "model.onnx"
        calibration = quantize.load_calibration(CIFAR_TRAIN, variant.preprocess)
        ref = quantize.run_graph(fp32_path, images)["logits"]
        acc32 = float(np.mean(ref.argmax(1) == labels))
        rows.append(f"| {name} | fp32 | - | {acc32:.4f} | - | - | - | - |")
        candidates = []
        for method in methods:
            path = work / f"{name}.int8.{method}.onnx"
            quantize.quantize_int8(fp32_path, path, calibration, method)
            candidates.append(("int8", f"{method}, {len(calibration.images)} images", path))
        path = work / f"{name}.fp16.onnx"
        quantize.convert_fp16(fp32_path, path)
        candidates.append(("fp16", "-", path))
        for precision, how, path in candidates:
            got = quantize.run_graph(path, images)["logits"]
            acc = float(np.mean(got.argmax(1) == labels))
            agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
            # RMS error over all logits of all images, relative to the RMS of the fp32 logits:
            # a continuous measure, less noisy than top-1 counts on 846 images.
            rms = float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))
            rel = relative_error(ref, got)
            rows.append(
                f"| {name} | {precision} | {how} | {acc:.4f} | {100 * (acc - acc32):+.2f} "
                f"| {agree:.4f} | {rms:.4f} | {rel:.3f} |"
            )
        print(f"accuracy: {name} done", file=sys.stderr)
    return rows


def timings(
    paths: dict[str, Path], crop: int, batch: int, seconds: float
) -> dict[str, list[float]]:
    """Seconds per batch of each graph, taken in turns over ``seconds``.

    Turns, not one graph after the other: this machine is shared, and work that others
    start mid-run then slows every precision alike instead of one of them.
    """
    sessions = {
        k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for k, p in paths.items()
    }
    x = np.random.default_rng(0).integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, {"images": x})
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times["fp32"]) < 5:
        for k, session in sessions.items():
            t = time.perf_counter()
            session.run(None, {"images": x})
            times[k].append(time.perf_counter() - t)
    return times


def speed(name: str, limit: int, seconds: float, work: Path) -> list[str]:
    variant = get_variant(name)
    weights = resolve(variant, "random")
    dirs = {
        "fp32": export_variant(variant, weights, work),
        "int8": export_variant(
            variant, weights, work, precision="int8", calibration=CIFAR_TRAIN,
            calibration_limit=limit,
        ),
        "fp16": export_variant(variant, weights, work, precision="fp16"),
    }  # fmt: skip
    rows = [
        "| model | precision | batch | runs | median ms per batch | min ms per batch "
        "| images/s (batch / median) | speed-up vs fp32 (medians) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    paths = {k: d / "model.onnx" for k, d in dirs.items()}
    loads = []
    for batch in (1, 8):
        load = os.getloadavg()[0]
        times = timings(paths, variant.preprocess.crop, batch, seconds)
        loads.append(f"batch {batch}: {load:.2f} -> {os.getloadavg()[0]:.2f}")
        base = statistics.median(times["fp32"])
        for precision, t in times.items():
            median = statistics.median(t)
            rows.append(
                f"| {name} (random weights) | {precision} | {batch} | {len(t)} "
                f"| {1000 * median:.1f} | {1000 * min(t):.1f} | {batch / median:.1f} "
                f"| {base / median:.2f}x |"
            )
        print(f"speed: batch {batch} done", file=sys.stderr)
    # Other work on the machine shows here: the 2 cores are all a run has.
    return [*rows, "", f"1-minute load average before -> after: {'; '.join(loads)}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=CIFAR_MODELS, help="CIFAR variants to evaluate")
    p.add_argument("--methods", nargs="*", default=list(quantize.CALIBRATION_METHODS))
    p.add_argument("--speed-model", default="resnet50", help="'' skips the speed table")
    p.add_argument("--speed-calibration", type=int, default=64, help="images for its int8")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per batch size")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="eval-precision.") as tmp:
        work = Path(tmp)
        lines = ["Machine:", "", *machine(), ""]
        if args.models:
            lines += ["Accuracy on the 846 CIFAR-10 test images:", ""]
            lines += [*accuracy(args.models, args.methods, work), ""]
        if args.speed_model:
            lines += ["CPU throughput:", ""]
            lines += speed(args.speed_model, args.speed_calibration, args.seconds, work)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
