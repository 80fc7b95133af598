"""Run by tests/service/test_kserve.py with KServe's SDK on PYTHONPATH: KServe's
``InferenceGRPCClient`` sends the images of an .npz file, as preprocessed UINT8 and as
encoded files (BYTES), and prints the logits and embeddings it got back, as JSON.

Usage: python kserve_client.py HOST:PORT MODEL IMAGES.npz"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput


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
