"""A stand-in for a peer's interpreter in tests: called as resnet-bench calls one
(``PYTHON -m resnet_serve.bench.peers.NAME --model-dir D --port P --workdir W``), it
records its command line and environment in W/argv.json and serves the peer's contract
(HEALTH_PATH, CLASSIFY_PATH with one multipart ``file`` or, for ``REQUEST = "v2"``, one
binary-tensor V2 request) with ``peers.common.Classifier`` under uvicorn, so that
resnet-bench's side of ``--peer`` is tested without any framework installed."""

from __future__ import annotations

import json
import os
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from resnet_serve.bench.peers import INTRA_OP_THREADS_ENV, arguments, peer
from resnet_serve.bench.peers.common import Classifier


def main(argv: list[str]) -> None:
    assert argv[0] == "-m", argv
    name = argv[1].rsplit(".", 1)[1]
    # The real peers' parser: what resnet-bench sends must be what they take.
    args = arguments(argv[1], argv[2:])
    started = {
        "argv": argv, "PATH": os.environ["PATH"], "workers": args.workers,
        "batch_delay_ms": args.batch_delay_ms,
        "intra_op_threads": os.environ.get(INTRA_OP_THREADS_ENV),
    }  # fmt: skip
    (args.workdir / "argv.json").write_text(json.dumps(started))
    contract = peer(name)
    model_dir = args.model_dir
    classifier = Classifier(model_dir)

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def classify(request: Request) -> JSONResponse:
        form = await request.form()
        data = await form["file"].read()  # type: ignore[union-attr]
        return JSONResponse(classifier.classify([data])[0])

    async def infer(request: Request) -> JSONResponse:
        body = await request.body()
        width = int(request.headers["inference-header-content-length"])
        (tensor,) = json.loads(body[:width])["inputs"]
        assert (tensor["name"], tensor["datatype"]) == (contract.v2_tensors[0], "BYTES")
        size = int.from_bytes(body[width : width + 4], "little")
        assert tensor["parameters"]["binary_data_size"] == 4 + size == len(body) - width
        answer = json.dumps(classifier.classify([body[width + 4 :]])[0])
        output = {"name": contract.v2_tensors[1], "datatype": "BYTES", "shape": [1, 1]}
        return JSONResponse({"outputs": [{**output, "data": [answer]}]})

    model = model_dir.name
    app = Starlette(routes=[
        Route(contract.health_path.format(model=model), health),
        Route(contract.classify_path.format(model=model),
              infer if contract.request == "v2" else classify, methods=["POST"]),
    ])  # fmt: skip
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
