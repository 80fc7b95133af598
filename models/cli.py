"""``resnet-export``: build ONNX models into a model repository."""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from pathlib import Path

from resnet_serve.models.catalog import VARIANTS, UnknownVariantError, get_variant, read_labels

EXIT_USAGE = 2
EXIT_FAILED = 1
# The choices of models.quantize, which imports torch; a test keeps the two equal.
PRECISIONS = ("fp32", "int8", "fp16")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
INT8_WEIGHT_BITS = (7, 8)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resnet-export",
        description="Export ResNet variants to ONNX (preprocessing inside the graph), verify "
        "them against PyTorch and write <repository>/<name>/model.onnx + model.json.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="variants to export (see --list)")
    p.add_argument("--list", action="store_true", help="list the known variants and exit")
    p.add_argument("--repository", type=Path, help="model repository directory (created if absent)")
    p.add_argument(
        "--weights",
        default="default",
        help="'default' (the catalog's published weights via torch.hub, honours TORCH_HOME), "
        "'random' (seeded, pretrained: false) or a path to a .pth/.th/.safetensors file",
    )
    p.add_argument(
        "--ema",
        action="store_true",
        help="with --weights PATH to a training checkpoint of timm's or torchvision's reference "
        "scripts (*.pth.tar, model_N.pth): its EMA weights (state_dict_ema, model_ema) instead "
        "of the trained ones (state_dict, model)",
    )
    p.add_argument(
        "--test-size",
        action="store_true",
        help="timm's weights: export at timm's test input size and crop (288 at crop_pct 1.0 "
        "instead of 224 at 0.95; --list shows the top-1 at both)",
    )
    p.add_argument(
        "--name",
        help="repository name for the model (one NAME only; default: NAME for fp32, "
        "NAME_int8 / NAME_fp16 otherwise)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        help="class names, one per line, one per class of the checkpoint (a fine-tuned one); "
        "without it, a checkpoint with another number of classes than the catalog's model "
        "gets them numbered 0, 1, ...",
    )
    p.add_argument(
        "--features",
        type=lambda text: tuple(f.strip() for f in text.split(",") if f.strip()),
        default=(),
        metavar="LAYERS",
        help="also output these backbone stages' feature maps (float32 NCHW), e.g. "
        "layer1,layer2,layer3,layer4 (CIFAR nets: layer1..layer3); model.json lists them "
        "with their channels and strides",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max ONNX-vs-PyTorch error relative to the output's largest value (default 1e-4); "
        "with int8/fp16 it applies to the fp32 graph they are made from",
    )
    g = p.add_argument_group("precision (docs/precision.md)")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default); int8: static quantization (uint8 activations, per-channel int8 "
        "weights, QDQ), for CPUs, needs --calibration; fp16: for the CUDA provider, it runs "
        "on the CPU provider but slower than fp32 there. Input stays uint8 and outputs "
        "float32, so the runtime serves every precision unchanged",
    )
    g.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR_or_NPZ",
        help="int8 calibration images, a few hundred like those the model will serve: a "
        "directory of image files, or an .npz with an 'images' uint8 [N, H, W, 3] array. "
        "They go through the runtime's own resize and crop",
    )
    g.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default=None,
        help="how activation ranges are chosen from the calibration (default percentile)",
    )
    g.add_argument(
        "--calibration-limit",
        type=_positive_int,
        metavar="N",
        help="use only the first N calibration images (sorted file names or .npz order)",
    )
    g.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="int8 must give the fp32 graph's top-1 class on at least this share of the "
        "calibration images, or the export fails (default 0.95)",
    )
    g.add_argument(
        "--int8-weight-bits",
        type=int,
        choices=INT8_WEIGHT_BITS,
        default=None,
        help="7 (default): weights in [-64, 63], exact on every x86-64 CPU; 8: full range, "
        "for CPUs with VNNI/AMX only (AVX2-only CPUs saturate, and the runtime's self-check "
        "refuses the model there)",
    )
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# A model's folder name in the repository (--name).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments as a whole, before anything is loaded."""
    if not args.names or args.repository is None:
        return "give NAME [NAME ...] and --repository DIR (or --list)"
    if args.name and len(args.names) != 1:
        return "--name needs exactly one NAME"
    if args.name is not None and not NAME_RE.fullmatch(args.name):
        # It names a folder the export replaces: "..", "." or a path would replace another.
        return (
            f"--name {args.name!r}: letters, digits, '.', '_' and '-' only, starting with a "
            "letter or digit"
        )
    for flag, value, low, high in (
        ("--tolerance", args.tolerance, 0.0, math.inf),
        ("--min-agreement", args.min_agreement, 0.0, 1.0),
    ):
        if value is not None and not (low < value <= high and math.isfinite(value)):
            return f"{flag} {value}: must be a finite number above {low:g}" + (
                f" and at most {high:g}" if math.isfinite(high) else ""
            )
    if args.labels is not None:
        try:
            names = read_labels(args.labels)
        except (OSError, UnicodeDecodeError) as exc:
            return f"--labels {args.labels}: cannot read it ({exc}); one class name per line"
        if not names:
            return f"--labels {args.labels}: no class names in it (one per line)"
    if args.ema and args.weights in ("default", "random"):
        return "--ema picks the EMA weights of a training checkpoint: give --weights PATH"
    int8_only = {
        "--calibration": args.calibration,
        "--calibration-method": args.calibration_method,
        "--calibration-limit": args.calibration_limit,
        "--min-agreement": args.min_agreement,
        "--int8-weight-bits": args.int8_weight_bits,
    }
    if args.precision != "int8":
        given = [flag for flag, value in int8_only.items() if value is not None]
        if given:
            return f"{', '.join(given)}: only used with --precision int8"
    elif args.calibration is None:
        return (
            "--precision int8 needs --calibration DIR_or_NPZ: a directory of image files or "
            "an .npz with an 'images' uint8 [N, H, W, 3] array (a few hundred images like "
            "those the model will serve)"
        )
    elif not args.calibration.exists():
        return f"--calibration {args.calibration}: no such file or directory"
    return None


def _list() -> None:
    width = max(map(len, VARIANTS))
    print(
        f"{'name':{width}} {'family':12} {'classes':>7} {'resize':>6} {'crop':>4} "
        f"{'interp':8} {'top-1':>6}  weights"
    )
    for v in VARIANTS.values():
        pre = v.preprocess
        # Without published weights (or a published top-1) no accuracy is claimed: null.
        top1 = "null" if v.weights is None else str(v.weights.reported_top1 or "null")
        if v.weights is None:
            source = "none published: --weights PATH or random"
        else:
            source = f"{v.weights.url} ({v.weights.publisher}, {v.dataset}"
            if v.test_preprocess is not None:
                source += f"; {v.weights.test_top1} at {v.test_preprocess.crop} with --test-size"
            source += ")"
        print(
            f"{v.name:{width}} {v.family:12} {v.num_classes:>7} {pre.resize:>6} {pre.crop:>4} "
            f"{pre.interpolation:8} {top1:>6}  {source}"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        _list()
        return 0
    problem = _usage_error(args)
    if problem:
        print(f"resnet-export: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        variants = [get_variant(n) for n in args.names]
        if args.test_size:
            variants = [v.at_test_size() for v in variants]
    except (UnknownVariantError, ValueError) as exc:
        print(f"resnet-export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    labels = read_labels(args.labels) if args.labels else None

    # torch is imported only now: --list and usage errors stay instant.
    from tqdm import tqdm

    from resnet_serve.models.export import (
        DEFAULT_OPSET,
        DEFAULT_TOLERANCE,
        ExportError,
        export_variant,
    )
    from resnet_serve.models.weights import WeightsError, class_labels, resolve

    # The exporter warns about torchvision ops it cannot register; we use none of them.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    failures = 0
    bar = tqdm(variants, unit="model", disable=len(variants) == 1 or None, file=sys.stderr)
    for variant in bar:
        bar.set_postfix_str(variant.name)
        try:
            weights = resolve(variant, args.weights, progress=sys.stderr.isatty(), ema=args.ema)
            names = class_labels(variant, weights, labels)
            if labels is None and len(names) != variant.num_classes:
                tqdm.write(
                    f"{variant.name}: the checkpoint has {len(names)} classes, not the "
                    f"catalog's {variant.num_classes}: they are numbered 0..{len(names) - 1}; "
                    "--labels FILE (one name per line) gives them names",
                    file=sys.stdout,
                )
            out = export_variant(
                variant,
                weights,
                args.repository,
                name=args.name,
                labels=names,
                opset=args.opset or DEFAULT_OPSET,
                tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                precision=args.precision,
                calibration=args.calibration,
                calibration_limit=args.calibration_limit,
                calibration_method=args.calibration_method,
                min_agreement=args.min_agreement,
                int8_weight_bits=args.int8_weight_bits,
                features=args.features,
            )
        except (WeightsError, ExportError) as exc:
            failures += 1
            tqdm.write(f"resnet-export: {variant.name}: {exc}", file=sys.stderr)
            continue
        tqdm.write(f"{variant.name}: wrote {out}", file=sys.stdout)
    return EXIT_FAILED if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
