"""Model outputs -> answers, the same for every protocol: softmax, top-k, pooling of
stage maps, L2 normalisation, and ``Outputs``, the result of one inference request."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from resnet_serve.contract.schema import LOGITS, POOLS, PROBABILITIES


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the indices and values of the ``k`` highest, highest first (ties: the
    lower index first)."""
    order = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    if values.ndim == 2:
        # The same as take_along_axis, without its generic index building (a request's
        # few rows: its Python was most of top-k's time).
        return order, values[np.arange(len(values))[:, None], order]
    return order, np.take_along_axis(values, order, axis=-1)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


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


@dataclass(frozen=True)
class Pooling:
    """A stage map's pooling (``how`` one of ``POOLS``; ``p``: GeM's exponent)."""

    how: str = "avg"
    p: float = 3.0


class Outputs:
    """One request's results: each graph output stacked over its images, in request
    order, with what every protocol derives from them."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def tensor(self, name: str) -> np.ndarray:
        """float32 ``[N, ...]``: a graph output, or the probabilities (softmax of logits)."""
        if name == PROBABILITIES:
            return self.probabilities().astype(np.float32)
        return self.arrays[name].astype(np.float32, copy=False)

    def probabilities(self) -> np.ndarray:
        computed = self.arrays.get(PROBABILITIES)  # with the batch, where asked for
        return computed if computed is not None else softmax(self.arrays[LOGITS])

    def features(
        self, name: str, pooling: Pooling | None = None, normalize: bool = False
    ) -> np.ndarray:
        """A vector output or a stage map, pooled to vectors if ``pooling``; vectors
        L2-normalised if ``normalize``."""
        array = self.tensor(name) if name == PROBABILITIES else self.arrays[name]
        if pooling is not None and pooling.how != "none":
            array = pool_maps(array, pooling.how, pooling.p)
        if array.ndim == 2 and normalize:
            array = l2_normalize(array)
        return array
