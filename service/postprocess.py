"""Model outputs -> answers: softmax top-k with labels, L2-normalised embeddings."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one image, most probable first."""
    probs = softmax(logits)
    k = min(k, probs.shape[-1])
    idx = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[-1] else np.arange(k)
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [{"index": int(i), "label": labels[i], "score": float(probs[i])} for i in idx]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


POOLS = ("avg", "max", "gem", "none")


def pool_maps(maps: np.ndarray, how: str, p: float = 3.0) -> np.ndarray:
    """``[N, C, H, W]`` feature maps to ``[N, C]`` vectors: average, max, or generalised
    mean (GeM: ``mean(x^p)^(1/p)`` over positions, on values clamped to be positive, as in
    Radenović et al.; p=1 is average, large p tends to max)."""
    if how == "avg":
        return maps.mean(axis=(2, 3))
    if how == "max":
        return maps.max(axis=(2, 3))
    if how == "gem":
        x = np.clip(maps.astype(np.float64), 1e-6, None)
        return np.power(np.power(x, p).mean(axis=(2, 3)), 1.0 / p).astype(np.float32)
    raise ValueError(f"pool must be one of {POOLS[:3]}, got {how!r}")


def to_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_embeddings(vectors: np.ndarray, encoding: str) -> list[Any] | np.ndarray:
    """``float``: the float32 array itself (orjson writes it as JSON numbers);
    ``base64``: each row as little-endian float32 bytes in base64, like OpenAI's API."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    return vectors
