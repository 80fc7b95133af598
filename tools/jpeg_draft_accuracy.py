"""Measure what the JPEG draft fast path (DCT-domain downscale) does to accuracy.

The 846 CIFAR-10 test images are upscaled (bicubic) to SIZE x SIZE, JPEG-encoded at
quality 90, then run through the service's preprocessing with and without draft and
classified by an exported model. Prints a markdown table.

    python tools/jpeg_draft_accuracy.py --model-dir model_repository/resnet20_cifar10
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from resnet_serve.contract.preprocess import DecodeOptions, preprocess
from resnet_serve.service.repository import load_model_spec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test-846.npz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--sizes", default="64,128,256,512")
    args = p.parse_args()
    spec = load_model_spec(args.model_dir)
    session = ort.InferenceSession(str(spec.onnx_path), providers=["CPUExecutionProvider"])
    with np.load(args.data) as d:
        images, labels = d["images"], d["labels"]
    print("| source size | draft | top-1 | agreement with no-draft | preprocess ms/img |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        blobs = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC).save(
                buf, "JPEG", quality=90
            )
            blobs.append(buf.getvalue())
        preds = {}
        for draft in (False, True):
            opts = DecodeOptions(jpeg_draft=draft)
            t = time.perf_counter()
            batch = np.stack([preprocess(b, i, spec.preprocess, opts) for i, b in enumerate(blobs)])
            ms = (time.perf_counter() - t) * 1000 / len(blobs)
            logits = session.run(["logits"], {"images": batch})[0]
            preds[draft] = logits.argmax(1)
            acc = float((preds[draft] == labels).mean())
            agree = float((preds[draft] == preds[False]).mean())
            state = "on" if draft else "off"
            print(f"| {size}x{size} | {state} | {acc:.4f} | {agree:.4f} | {ms:.3f} |")


if __name__ == "__main__":
    main()
