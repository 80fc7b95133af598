"""``resnet-export``: build ONNX models into a model repository."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.catalog import VARIANTS, UnknownVariantError, get_variant, read_labels

EXIT_USAGE = 2
EXIT_FAILED = 1


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
    p.add_argument("--name", help="repository name for the model (one NAME only; default: NAME)")
    p.add_argument(
        "--labels",
        type=Path,
        help="class names, one per line, for a fine-tuned checkpoint (sets num_classes)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max ONNX-vs-PyTorch error relative to the output's largest value (default 1e-4)",
    )
    return p


def _list() -> None:
    print(f"{'name':22} {'family':10} {'classes':>7} {'resize':>6} {'crop':>4}  weights")
    for v in VARIANTS.values():
        top1 = f" (reported top-1 {v.weights.reported_top1} on {v.dataset})" if v.weights else ""
        url = v.weights.url if v.weights else "-"
        print(
            f"{v.name:22} {v.family:10} {v.num_classes:>7} {v.preprocess.resize:>6} "
            f"{v.preprocess.crop:>4}  {url}{top1}"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        _list()
        return 0
    if not args.names or args.repository is None:
        print(
            "resnet-export: give NAME [NAME ...] and --repository DIR (or --list)", file=sys.stderr
        )
        return EXIT_USAGE
    if args.name and len(args.names) != 1:
        print("resnet-export: --name needs exactly one NAME", file=sys.stderr)
        return EXIT_USAGE
    try:
        variants = [get_variant(n) for n in args.names]
    except UnknownVariantError as exc:
        print(f"resnet-export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    labels = read_labels(args.labels) if args.labels else None

    # torch is imported only now: --list and usage errors stay instant.
    from tqdm import tqdm

    from models.export import DEFAULT_OPSET, DEFAULT_TOLERANCE, ExportError, export_variant
    from models.weights import WeightsError, resolve

    # The exporter warns about torchvision ops it cannot register; we use none of them.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    failures = 0
    bar = tqdm(variants, unit="model", disable=len(variants) == 1 or None, file=sys.stderr)
    for variant in bar:
        bar.set_postfix_str(variant.name)
        try:
            weights = resolve(variant, args.weights, progress=sys.stderr.isatty())
            out = export_variant(
                variant,
                weights,
                args.repository,
                name=args.name,
                labels=labels,
                opset=args.opset or DEFAULT_OPSET,
                tolerance=args.tolerance or DEFAULT_TOLERANCE,
            )
        except (WeightsError, ExportError) as exc:
            failures += 1
            tqdm.write(f"resnet-export: {variant.name}: {exc}", file=sys.stderr)
            continue
        tqdm.write(f"{variant.name}: wrote {out}", file=sys.stdout)
    return EXIT_FAILED if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
