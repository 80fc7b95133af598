"""KServe's own gRPC client (``kserve.InferenceGRPCClient``) against the V2 gRPC server:
the same top-1 classes and embeddings as /v1 for the same images, sent as preprocessed
UINT8 pixels and as encoded files (BYTES). The client runs in a subprocess with KServe's
SDK on its path (tests/conftest.py's kserve_path: its pins are not the project's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from resnet_serve.service.settings import Settings
from tests.service import tiny
from tests.service.servers import ProcessServer, free_port

pytestmark = pytest.mark.skipif(
    "grpc_port" not in Settings.model_fields, reason="no gRPC server in this build"
)

MODEL = tiny.NAME
COUNT = 8
CLIENT = Path(__file__).with_name("kserve_client.py")


@pytest.fixture(scope="module")
def served(tiny_repository: Path) -> Iterator[tuple[ProcessServer, int]]:
    grpc_port = free_port()
    srv = ProcessServer(tiny_repository, grpc_port=str(grpc_port)).start()
    yield srv, grpc_port
    assert srv.stop() == 0


def _v1(srv: ProcessServer, pngs: list[bytes]) -> tuple[list[int], np.ndarray]:
    files = [("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    classes = httpx.post(f"{srv.url}/v1/models/{MODEL}/classify?top_k=1", files=files, timeout=60)
    embed = httpx.post(
        f"{srv.url}/v1/models/{MODEL}/embed?normalize=false", files=files, timeout=60
    )
    assert classes.status_code == 200 and embed.status_code == 200, (classes.text, embed.text)
    top1 = [r["predictions"][0]["index"] for r in classes.json()["results"]]
    return top1, np.asarray(embed.json()["embeddings"], dtype=np.float32)


def test_kserve_grpc_client_matches_v1(
    served: tuple[ProcessServer, int],
    kserve_path: Path,
    tiny_images: np.ndarray,
    tiny_pngs: list[bytes],
    tmp_path: Path,
) -> None:
    srv, grpc_port = served
    pixels, pngs = tiny_images[:COUNT], tiny_pngs[:COUNT]
    images = tmp_path / "images.npz"
    np.savez(images, pixels=pixels, files=np.array(pngs, dtype=np.object_))
    env = {**os.environ, "PYTHONPATH": str(kserve_path)}
    proc = subprocess.run(
        [sys.executable, str(CLIENT), f"127.0.0.1:{grpc_port}", MODEL, str(images)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ready"] is True
    top1, embeddings = _v1(srv, pngs)
    for form in ("uint8", "bytes"):
        logits = np.asarray(got[form]["logits"], dtype=np.float32)
        assert logits.argmax(axis=1).tolist() == top1, form
        np.testing.assert_allclose(
            np.asarray(got[form]["embedding"]), embeddings, rtol=1e-4, atol=1e-5, err_msg=form
        )
