"""The strongest obvious baseline: FastAPI + onnxruntime on the very ``model.onnx`` the
service serves, written the way a user who knows both would write it.

- a plain ``def`` endpoint, so FastAPI runs each request in its thread pool (decode and
  ``session.run`` release the GIL, so requests overlap) instead of on the event loop;
- one ``onnxruntime.InferenceSession`` with onnxruntime's default options (its own choice
  of intra-op threads, spinning on), shared by every request (``run`` is thread-safe);
- the service's own Pillow preprocessing (``contract.preprocess.preprocess`` with the same
  ``DecodeOptions``, JPEG draft included), so decoding costs the same on both sides and
  the comparison is of the serving, not of the image code;
- no batching: one image per request, one ``run`` per image;
- top-5 as JSON, in the shape of the service's ``/classify`` answer.

Run: ``BASELINE_MODEL_DIR=repo/resnet50 uvicorn bench.baseline_ort:app_from_env --factory``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File

from resnet_serve.contract.preprocess import DecodeOptions, preprocess
from resnet_serve.service.repository import load_model_spec


def create_app(model_dir: Path) -> FastAPI:
    spec = load_model_spec(model_dir)
    session = ort.InferenceSession(str(spec.onnx_path), providers=["CPUExecutionProvider"])
    options = DecodeOptions()
    labels = spec.labels
    top = min(5, len(labels))
    app = FastAPI(title="FastAPI + onnxruntime baseline")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/classify")
    def classify(file: bytes = File()) -> dict[str, Any]:
        image = preprocess(file, 0, spec.preprocess, options)
        (logits,) = session.run(["logits"], {"images": image[None]})
        row = logits[0].astype(np.float64)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs)[:top]
        predictions = [
            {"index": int(i), "label": labels[int(i)], "score": float(probs[i])} for i in order
        ]
        return {"model": spec.name, "results": [{"predictions": predictions}]}

    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory``: ``BASELINE_MODEL_DIR``."""
    return create_app(Path(os.environ["BASELINE_MODEL_DIR"]))
