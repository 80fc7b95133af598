"""Run by tests/service/test_kserve.py with KServe's SDK on PYTHONPATH: KServe's
``InferenceGRPCClient`` sends the images of an .npz file, as preprocessed UINT8 and as
encoded files (BYTES), and prints the logits and embeddings it got back, as JSON.

KServe's package ``__init__`` imports its model server and Kubernetes SDK, which a client
never uses: ``kserve`` is registered as a bare package over its installed files (as
tools/timm_source.py does for torchvision), and its client modules are then imported
unchanged.

Usage: python kserve_client.py HOST:PORT MODEL IMAGES.npz"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import types

import numpy as np


def _bare_kserve() -> None:
    spec = importlib.util.find_spec("kserve")
    assert spec is not None and spec.submodule_search_locations, "kserve is not on the path"
    package = types.ModuleType("kserve")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = package


_bare_kserve()
from kserve.inference_client import InferenceGRPCClient  # noqa: E402
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput  # noqa: E402


async def infer(client: InferenceGRPCClient, model: str, inp: InferInput) -> dict[str, list]:
    outputs = [RequestedOutput("logits"), RequestedOutput("embedding")]
    request = InferRequest(model, [inp], request_outputs=outputs)
    response = await client.infer(request)
    return {out.name: out.as_numpy().tolist() for out in response.outputs}


async def main(url: str, model: str, path: str) -> None:
    with np.load(path, allow_pickle=True) as d:  # the test's own file: encoded images
        pixels, files = d["pixels"], [bytes(f) for f in d["files"]]
    pixels_in = InferInput("images", list(pixels.shape), "UINT8")
    pixels_in.set_data_from_numpy(pixels, binary_data=True)
    files_in = InferInput("images", [len(files)], "BYTES")
    files_in.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    async with InferenceGRPCClient(url, timeout=60) as client:
        ready = await client.is_server_ready()
        result = {
            "ready": ready,
            "uint8": await infer(client, model, pixels_in),
            "bytes": await infer(client, model, files_in),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
