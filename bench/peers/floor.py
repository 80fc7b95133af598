"""Peer: the least a Python server with batching can do, as a floor for the others.

A bare ASGI function under uvicorn (uvloop, httptools: the same server stack as
resnet-serve's), no framework, no routing table, no middleware, no validation, no
metrics, no logs: ``POST /classify`` reads the body, takes the ``file`` part out of the
multipart form with python-multipart (the parser resnet-serve and Starlette use) or takes
a raw image body as it is, queues
the image with a future and waits. One asyncio task per process takes whatever has queued
(at most 32) whenever the model is free, greedily, and hands it to one thread that
decodes every image (``common.Classifier``: the service's decoding, the same session
settings) and runs the batch; the answers go back as JSON (orjson). ``--workers N``: N
such processes sharing the port (``SO_REUSEPORT``), each with its own session and
cores // N intra-op threads, as ``resnet-serve --workers N``.

It is what the offline pipeline's best configuration (bench/tune.py: decode and run on a
session's own thread, a batch per run) becomes with HTTP in front and nothing else: the
ceiling a Python server can reach on the machine, which puts the service's distance from
the offline pipeline in proportion. Not a server to deploy: a bad image fails its whole
batch (500), nothing is bounded, nothing is observable.

Run: ``PYTHON -m resnet_serve.bench.peers.floor --model-dir DIR --port PORT --workdir DIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

from resnet_serve.bench.peers import MAX_BATCH_SIZE, arguments, until_stopped

# bench/peers/floor.txt's pin: the label is read where uvicorn is not installed.
UVICORN_VERSION = "0.55.0"

LABEL = f"bare ASGI + batching (uvicorn {UVICORN_VERSION})"
HEALTH_PATH = "/health"
CLASSIFY_PATH = "/classify"
DESCRIPTION = (
    "the floor: a bare ASGI function under uvicorn (uvloop, httptools), no framework, "
    "middleware, validation, metrics or logs; the multipart `file` part taken out by "
    "python-multipart (a raw image body taken as it is), one asyncio task per process "
    "batching greedily (whatever queued "
    f"while the model was busy, at most {MAX_BATCH_SIZE}; --batch-delay-ms does not apply), "
    "and one thread per process that decodes the batch's images and runs it (the offline "
    "pipeline's best shape); --workers N processes share the port (SO_REUSEPORT), cores // N "
    "intra-op threads each"
)

# A body of these types is the image itself, as resnet-serve takes it (resnet-bench
# --body raw).
RAW_BODY = True
RAW_TYPES = (b"image/", b"application/octet-stream")
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def file_part(content_type: bytes, body: bytes) -> bytes:
    """The first part of a multipart body (resnet-bench sends one, ``file``)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    parts: list[bytearray] = []
    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_part_begin": lambda: parts.append(bytearray()),
            "on_part_data": lambda data, start, end: parts[-1].extend(data[start:end]),
        },
    )
    parser.write(body)
    parser.finalize()
    return bytes(parts[0])


class FloorApp:
    """The ASGI application of one process."""

    def __init__(self, model_dir: Path, ready: Callable[[], bool]) -> None:
        from resnet_serve.bench.peers.common import Classifier

        self.classifier = Classifier(model_dir)
        self.ready = ready
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="floor-model")
        self.queue: list[tuple[bytes, asyncio.Future[dict[str, Any]]]] = []
        self.arrived: asyncio.Event | None = None

    async def batches(self) -> None:
        assert self.arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            batch = self.queue[:MAX_BATCH_SIZE]
            del self.queue[:MAX_BATCH_SIZE]
            try:
                answers = await loop.run_in_executor(
                    self.thread, self.classifier.classify, [blob for blob, _ in batch]
                )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["path"] == HEALTH_PATH:
            if self.ready():
                await self.answer(send, 200, b'{"ready":true}')
            else:
                await self.answer(send, 503, b'{"ready":false}')
        elif scope["path"] == CLASSIFY_PATH and scope["method"] == "POST":
            await self.classify(scope, receive, send)
        else:
            await self.answer(send, 404, b'{"error":"not found"}')

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.arrived = asyncio.Event()
                self.task = asyncio.create_task(self.batches())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.task.cancel()
                self.thread.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def classify(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        import orjson

        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        try:
            if content_type.startswith(RAW_TYPES):
                blob = b"".join(chunks)
            else:
                blob = file_part(content_type, b"".join(chunks))
        except Exception as exc:
            await self.answer(send, 400, orjson.dumps({"error": str(exc)}))
            return
        assert self.arrived is not None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.queue.append((blob, future))
        self.arrived.set()
        try:
            answer = await future
        except Exception as exc:
            await self.answer(send, 500, orjson.dumps({"error": str(exc)}))
            return
        await self.answer(send, 200, orjson.dumps(answer))

    @staticmethod
    async def answer(send: Send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def serve(model_dir: Path, port: int, workdir: Path, workers: int) -> None:
    """One process: its own socket on the shared port, uvicorn until SIGTERM. Healthy once
    every process has its model (a file each in ``workdir``), so that the load meets all."""
    import uvicorn

    def ready() -> bool:
        return len(list(workdir.glob("ready-*"))) >= workers

    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(
        FloorApp(model_dir, ready), log_level="warning", access_log=False, lifespan="on",
    )  # fmt: skip
    server = uvicorn.Server(config)
    # Written once the model is loaded (FloorApp above) and the server is about to listen.
    (workdir / f"ready-{os.getpid()}").touch()
    server.run(sockets=[sock])


def main() -> None:
    one = sys.argv[1:]
    if one[:1] == ["--serve-one"]:
        serve(Path(one[1]), int(one[2]), Path(one[3]), int(one[4]))
        return
    args = arguments("python -m resnet_serve.bench.peers.floor")
    if (installed := version("uvicorn")) != UVICORN_VERSION:
        print(f"floor peer: uvicorn {installed}, the label says {UVICORN_VERSION}", file=sys.stderr)
    # Every process from this module's own command line, so that each starts as the first
    # does (the intra-op split is in the environment ``arguments`` set).
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("ready-*"):
        old.unlink()
    command = [
        sys.executable, "-m", "resnet_serve.bench.peers.floor", "--serve-one",
        str(args.model_dir.resolve()), str(args.port), str(workdir), str(args.workers),
    ]  # fmt: skip
    servers = [subprocess.Popen(command) for _ in range(args.workers)]

    stopping = until_stopped(lambda: all(s.poll() is None for s in servers))
    for s in servers:
        if s.poll() is None:
            s.send_signal(signal.SIGTERM)
    codes = []
    for s in servers:
        try:
            codes.append(s.wait(timeout=30))
        except subprocess.TimeoutExpired:
            s.kill()
            codes.append(s.wait())
    if not stopping:  # a server ended by itself: fail as it did
        sys.exit(next((c for c in codes if c), 1) or 1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
