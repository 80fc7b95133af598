"""What a request costs a Python HTTP server before any model: the floor under resnet-serve.

    python -m tools.http_floor [--seconds 4] [--rounds 3] [--clients 16]

Four servers answer the same ``POST /v1/models/tiny/classify`` with a 32x32 PNG body, one
after another, each under the same closed-loop clients (resnet-bench's lean client, one
keep-alive connection each): a bare ASGI function, a Starlette route, a FastAPI route (with
a path and a query parameter, as the service's routes), each reading the body and answering
a fixed small JSON, all on uvicorn with uvloop and httptools as resnet-serve runs; and
resnet-serve itself with the tiny test model (a few arithmetic ops: what is left is HTTP,
the framework, the core, the hand-offs to the decode and session threads, the answer).
Per server: requests a second and its CPU time per request (every thread, from
``/proc/PID/task/*/stat``), medians over the rounds. docs/benchmarks.md uses it to set the
service's per-request cost against what the layers under it cost by themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from resnet_serve.bench import rawhttp
from tests.service import tiny
from tools.perf_analyzer import cpu_line, free_port, wait_ready
from tools.request_cost import thread_cpu_seconds

PATH = f"/v1/models/{tiny.NAME}/classify"
ANSWER = (
    b'{"model":"tiny","results":[{"predictions":[{"index":3,"label":"3","score":0.91},'
    b'{"index":1,"label":"1","score":0.05}]}]}'
)


async def raw_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """The bare ASGI floor: read the body, send the answer (run with --lifespan off)."""
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


def starlette_app() -> Starlette:
    async def answer(request: Request) -> Response:
        await request.body()
        return Response(ANSWER, media_type="application/json")

    return Starlette(routes=[Route("/v1/models/{model}/classify", answer, methods=["POST"])])


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/models/{model}/classify")
    async def answer(request: Request, model: str, top_k: int = 5) -> Response:
        await request.body()
        return Response(ANSWER, media_type="application/json")

    return app


def process_cpu(pid: int) -> float:
    return sum(thread_cpu_seconds(pid).values())


async def measure(port: int, pid: int, body: bytes, clients: int, seconds: float):  # type: ignore[no-untyped-def]
    host, _, requests = rawhttp.prepare(
        f"http://127.0.0.1:{port}{PATH}", [body], [("Content-Type", "image/png")]
    )
    done = 0
    stop = False

    async def client() -> None:
        nonlocal done
        conn = await rawhttp.Connection.open(host, port)
        try:
            while not stop:
                status, answer = await conn.exchange(requests[0], 30.0)
                if status != 200:
                    raise SystemExit(f"{status}: {answer[:200]!r}")
                done += 1
        finally:
            conn.close()

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    await asyncio.sleep(1.0)  # warm
    d0, c0, t0 = done, process_cpu(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    d1, c1, t1 = done, process_cpu(pid), time.perf_counter()
    stop = True
    await asyncio.gather(*tasks)
    n = d1 - d0
    return n / (t1 - t0), (c1 - c0) / n * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args(argv)
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    body = buf.getvalue()
    uvicorn = [sys.executable, "-m", "uvicorn", "--loop", "uvloop", "--http", "httptools",
               "--log-level", "warning", "--no-access-log", "--lifespan", "off"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        tiny.export(repo)
        servers = {
            "bare ASGI": [*uvicorn, "tools.http_floor:raw_app"],
            "Starlette route": [*uvicorn, "--factory", "tools.http_floor:starlette_app"],
            "FastAPI route": [*uvicorn, "--factory", "tools.http_floor:fastapi_app"],
            "resnet-serve (tiny model)": ["resnet-serve", "--repository", str(repo),
                                          "--tuning", "off", "--log-level", "warning"],
        }  # fmt: skip
        print(f"# machine: {cpu_line()}; load average before: {os.getloadavg()[0]:.2f}\n")
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for name, command in servers.items():
            port = free_port()
            proc = subprocess.Popen([*command, "--port", str(port)], start_new_session=True)
            try:
                if name.startswith("resnet-serve"):
                    wait_ready(f"http://127.0.0.1:{port}", proc)  # type: ignore[arg-type]
                else:
                    _wait_port(port)
                for _ in range(args.rounds):
                    results[name].append(
                        rawhttp.run(measure(port, proc.pid, body, args.clients, args.seconds))
                    )
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    load = os.getloadavg()[0]
    print(f"{args.clients} clients, a {len(body)}-byte PNG per request, {args.seconds:g} s "
          f"per round, {args.rounds} rounds; load average after: {load:.2f}\n")  # fmt: skip
    print("| server | req/s (rounds) | server CPU ms / request (median) |")
    print("|---|---|---:|")
    for name, rows in results.items():
        rates = ", ".join(f"{r:.0f}" for r, _ in rows)
        print(f"| {name} | {rates} | {statistics.median(c for _, c in rows):.3f} |")
    return 0


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    import socket

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


if __name__ == "__main__":
    raise SystemExit(main())
