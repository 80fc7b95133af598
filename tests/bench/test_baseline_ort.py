"""The FastAPI + onnxruntime baseline serves the service's own model file: same answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resnet_serve.bench.baseline_ort import create_app
from tests.service.servers import classify_each, png, thread_server


def test_same_answers_as_the_service(
    cifar_repository: Path, cifar_test: dict[str, np.ndarray]
) -> None:
    images, labels = cifar_test["images"][:24], cifar_test["labels"][:24]
    blobs = [png(img) for img in images]
    with thread_server(cifar_repository, models="resnet20_cifar10") as srv:
        served = classify_each(srv.url, "resnet20_cifar10", blobs)

    # The `def` endpoint runs in FastAPI's thread pool; TestClient-style ASGI transport
    # through a real event loop, one request per image as the baseline is used.
    from fastapi.testclient import TestClient

    with TestClient(create_app(cifar_repository / "resnet20_cifar10")) as client:
        ours = []
        for i, b in enumerate(blobs):
            r = client.post("/classify", files={"file": (f"{i}.png", b, "image/png")})
            assert r.status_code == 200, r.text
            (result,) = r.json()["results"]
            ours.append(result["predictions"])
    for mine, theirs in zip(ours, served, strict=True):
        assert [p["index"] for p in mine] == [p["index"] for p in theirs]
        assert [p["score"] for p in mine] == pytest.approx([p["score"] for p in theirs], abs=1e-5)
    # Real weights: the answers know CIFAR-10 (0.917 on the shared set).
    assert float(np.mean([p[0]["index"] for p in ours] == labels)) >= 0.8
