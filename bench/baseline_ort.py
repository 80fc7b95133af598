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
- top-5 as JSON, in the shape of the service's ``/classify`` answer;
- all of it ``peers.common.Classifier``, which the peers of ``resnet-bench --peer`` run too.

Run: ``BASELINE_MODEL_DIR=repo/resnet50 uvicorn bench.baseline_ort:app_from_env --factory``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File

from resnet_serve.bench.peers.common import Classifier


def create_app(model_dir: Path) -> FastAPI:
    # The same session, decoding and answer as the peers of bench/peers/, one image a run.
    classifier = Classifier(model_dir)
    app = FastAPI(title="FastAPI + onnxruntime baseline")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/classify")
    def classify(file: bytes = File()) -> dict[str, Any]:
        return classifier.answer(classifier.logits([classifier.decode(file)])[0])

    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory``: ``BASELINE_MODEL_DIR``."""
    return create_app(Path(os.environ["BASELINE_MODEL_DIR"]))
