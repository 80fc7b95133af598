"""The baseline: a classification server as one would first write it with FastAPI and
PyTorch, to measure ``resnet-serve`` against.

One image per request, no batching, no thread pool: the handler is ``async def`` and
decodes, preprocesses and runs the eager model on the event loop, as most FastAPI +
PyTorch examples do. The model is the same as the served ONNX file's: its ``model.json``
names the architecture (``arch``) and the weights it was exported from, and the weights
are loaded through ``models.weights`` and checked against the recorded sha256. For
``pretrained: false`` exports the weights are the seeded ``random`` ones, identical.

Run: ``NAIVE_MODEL_DIR=repo/resnet50 uvicorn bench.naive_server:app_from_env --factory``
or ``python -m bench.naive_server --model-dir repo/resnet50``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, UploadFile
from PIL import Image
from torch import nn

from resnet_serve.models.catalog import get_variant
from resnet_serve.models.weights import Weights, WeightsError, build_model, resolve

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def weights_source(meta: dict[str, Any]) -> str:
    """What ``models.weights.resolve`` needs to rebuild the weights ``model.json`` records:
    ``random``, ``default`` (the catalog's URL) or the local file it was exported from."""
    recorded = meta.get("weights") or {}
    if not recorded.get("pretrained", True):
        return "random"
    variant = get_variant(str(meta["arch"]))
    source = str(recorded.get("source", ""))
    if variant.weights is not None and source == variant.weights.url:
        return "default"
    if source and Path(source).is_file():
        return source
    raise WeightsError(
        f"model.json records weights from {source or '(nothing)'}, which is neither the "
        f"catalog's URL nor a file here: pass the checkpoint with --weights"
    )


def load_model(meta: dict[str, Any], weights: str | None = None) -> nn.Module:
    variant = get_variant(str(meta["arch"]))
    resolved: Weights = resolve(variant, weights or weights_source(meta))
    recorded = (meta.get("weights") or {}).get("sha256")
    if recorded and resolved.sha256 and recorded != resolved.sha256:
        # Comparing against other weights than the served ones would make every ratio moot.
        raise WeightsError(
            f"the weights found ({resolved.source}, sha256 {resolved.sha256[:12]}...) are not "
            f"the ones model.json records (sha256 {recorded[:12]}...)"
        )
    return build_model(variant, resolved, num_classes=int(meta["num_classes"]))


def create_app(model_dir: Path, weights: str | None = None) -> FastAPI:
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    model = load_model(meta, weights)
    labels: list[str] = list(meta["labels"])
    pre = meta["preprocess"]
    resize, crop = int(pre["resize"]), int(pre["crop"])
    resample = _RESAMPLE[pre.get("interpolation", "bilinear")]
    mean = torch.tensor(pre["mean"]).view(3, 1, 1)
    std = torch.tensor(pre["std"]).view(3, 1, 1)
    name = str(meta.get("name", model_dir.name))

    def transform(img: Image.Image) -> torch.Tensor:
        # torchvision's Resize(resize) + CenterCrop(crop) + ToTensor + Normalize.
        w, h = img.size
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        img = img.resize(size, resample)
        left = round((size[0] - crop) / 2.0)
        top = round((size[1] - crop) / 2.0)
        img = img.crop((left, top, left + crop, top + crop))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (x.float() / 255.0 - mean) / std

    app = FastAPI(title="naive ResNet server")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/classify")
    async def classify(file: UploadFile) -> dict[str, Any]:
        data = await file.read()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        x = transform(img).unsqueeze(0)
        with torch.inference_mode():
            probs = torch.softmax(model(x), dim=1)[0]
        scores, indices = torch.topk(probs, min(5, len(labels)))
        predictions = [
            {"index": int(i), "label": labels[int(i)], "score": float(s)}
            for s, i in zip(scores, indices, strict=True)
        ]
        return {"model": name, "results": [{"predictions": predictions}]}

    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory``: ``NAIVE_MODEL_DIR`` and optional ``NAIVE_WEIGHTS``."""
    return create_app(Path(os.environ["NAIVE_MODEL_DIR"]), os.environ.get("NAIVE_WEIGHTS"))


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True, help="<repository>/<name>")
    p.add_argument("--weights", help="default | random | PATH (default: what model.json records)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    uvicorn.run(create_app(args.model_dir, args.weights), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
