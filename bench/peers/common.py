"""What every peer runs per image and per batch, so that only the serving differs: the
service's own decoding (``contract.preprocess`` with default ``DecodeOptions``, JPEG draft
included, as bench/baseline_ort.py), one onnxruntime session with onnxruntime's default
options (its own intra-op thread count unless N workers split the cores; spinning on), and
top-5 as the service answers. Imports numpy, Pillow and onnxruntime only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from resnet_serve.bench.peers import INTRA_OP_THREADS_ENV
from resnet_serve.contract.preprocess import DecodeOptions, preprocess
from resnet_serve.contract.schema import load_model_spec


class Classifier:
    def __init__(self, model_dir: Path) -> None:
        self.spec = load_model_spec(Path(model_dir))
        options = ort.SessionOptions()
        # Set by peers.arguments for N > 1 workers; otherwise onnxruntime's own choice.
        options.intra_op_num_threads = int(os.environ.get(INTRA_OP_THREADS_ENV, "0"))
        self.session = ort.InferenceSession(
            str(self.spec.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.options = DecodeOptions()
        self.top = min(5, len(self.spec.labels))

    def decode(self, data: bytes) -> np.ndarray:
        """One encoded image -> the model's uint8 NHWC input row, [H, W, 3]."""
        return preprocess(data, 0, self.spec.preprocess, self.options)

    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One ``run`` for the whole batch."""
        (out,) = self.session.run(["logits"], {"images": np.stack(images)})
        return out

    def answer(self, row: np.ndarray) -> dict[str, Any]:
        """One image's logits -> the service's /classify answer for a one-image request."""
        row = row.astype(np.float64)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs)[: self.top]
        labels = self.spec.labels
        predictions = [
            {"index": int(i), "label": labels[int(i)], "score": float(probs[i])} for i in order
        ]
        return {"model": self.spec.name, "results": [{"predictions": predictions}]}

    def classify(self, images: Sequence[bytes]) -> list[dict[str, Any]]:
        """Decode, one batched run, answers: what a peer's batch handler does."""
        logits = self.logits([self.decode(d) for d in images])
        return [self.answer(row) for row in logits]
