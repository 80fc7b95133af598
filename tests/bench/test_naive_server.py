"""The naive baseline serves the same model as the service: same weights, same answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

pytest.importorskip("torch")

from resnet_serve.bench.naive_server import create_app, load_model, weights_source
from resnet_serve.models.catalog import get_variant
from resnet_serve.models.weights import WeightsError
from tests.service.servers import classify_each, png, thread_server

R20_URL = get_variant("resnet20_cifar10").weights.url  # type: ignore[union-attr]


async def _classify_naive(app: FastAPI, blobs: list[bytes]) -> list[list[dict[str, Any]]]:
    """The app's top-5 for each image, one request per image as it is meant to be used."""
    out = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://naive") as client:
        for i, b in enumerate(blobs):
            resp = await client.post("/classify", files={"file": (f"{i}.png", b, "image/png")})
            assert resp.status_code == 200, resp.text
            (result,) = resp.json()["results"]
            out.append(result["predictions"])
    return out


def test_same_top1_as_the_service(
    cifar_repository: Path, cifar_test: dict[str, np.ndarray], torch_home: Path
) -> None:
    images = cifar_test["images"][:32]
    labels = cifar_test["labels"][:32]
    blobs = [png(img) for img in images]
    with thread_server(cifar_repository, models="resnet20_cifar10") as srv:
        served = classify_each(srv.url, "resnet20_cifar10", blobs)

    naive = asyncio.run(_classify_naive(create_app(cifar_repository / "resnet20_cifar10"), blobs))
    assert [p[0]["index"] for p in naive] == [p[0]["index"] for p in served]
    for mine, theirs in zip(naive, served, strict=True):
        assert len(mine) == 5
        assert mine[0]["label"] == theirs[0]["label"]
        assert mine[0]["score"] == pytest.approx(theirs[0]["score"], abs=1e-3)
    # The published weights, not random ones: they know CIFAR-10 (0.917 on the shared set).
    accuracy = float(np.mean([p[0]["index"] for p in naive] == labels))
    assert accuracy >= 0.8


def test_weights_source_follows_model_json(tmp_path: Path) -> None:
    arch = {"arch": "resnet20_cifar10"}
    assert weights_source({**arch, "weights": {"pretrained": False}}) == "random"
    assert weights_source({**arch, "weights": {"source": R20_URL, "pretrained": True}}) == (
        "default"
    )
    local = tmp_path / "finetuned.pth"
    local.write_bytes(b"x")
    assert weights_source({**arch, "weights": {"source": str(local), "pretrained": True}}) == (
        str(local)
    )
    with pytest.raises(WeightsError, match="--weights"):
        weights_source({**arch, "weights": {"source": str(tmp_path / "gone.pth")}})


def test_refuses_weights_other_than_the_exported_ones(
    cifar_repository: Path, torch_home: Path
) -> None:
    meta = json.loads((cifar_repository / "resnet20_cifar10" / "model.json").read_text())
    load_model(meta)  # the control: the recorded weights load
    meta["weights"]["sha256"] = "0" * 64
    with pytest.raises(WeightsError, match=r"not the ones model\.json records"):
        load_model(meta)
