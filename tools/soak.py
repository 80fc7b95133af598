"""Soak test: mixed valid, invalid and oversized traffic for a while, against a server
this script starts. Reports resident memory at start and end, answers by status code,
and latency percentiles. Not part of CI.

    python tools/soak.py --repository model_repository --model resnet20_cifar10 --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-test-846.npz"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def corpus() -> dict[str, list[bytes]]:
    with np.load(DATA) as d:
        images = d["images"][:200]
    pngs, jpegs = [], []
    for im in images:
        for fmt, out in (("PNG", pngs), ("JPEG", jpegs)):
            buf = io.BytesIO()
            Image.fromarray(im).resize((160, 120)).save(buf, fmt)
            out.append(buf.getvalue())
    return {"png": pngs, "jpeg": jpegs}


async def one(session: aiohttp.ClientSession, url: str, kind: str, c: dict[str, list[bytes]]):  # type: ignore[no-untyped-def]
    img = random.choice(c["png"] + c["jpeg"])
    if kind == "classify":
        return await session.post(
            url + "/v1/classify", data=img, headers={"content-type": "image/png"}
        )
    if kind == "multi":
        form = aiohttp.FormData()
        for i in range(8):
            form.add_field("file", random.choice(c["jpeg"]), filename=f"{i}.jpg")
        return await session.post(url + "/v1/classify?top_k=3", data=form)
    if kind == "embed-json":
        body = {"images": [base64.b64encode(img).decode()], "encoding": "base64"}
        return await session.post(url + "/v1/embed", json=body)
    if kind == "garbage":
        return await session.post(
            url + "/v1/classify",
            data=os.urandom(random.randint(0, 4000)),
            headers={"content-type": "image/jpeg"},
        )
    if kind == "truncated":
        return await session.post(
            url + "/v1/classify", data=img[: len(img) // 3], headers={"content-type": "image/png"}
        )
    if kind == "oversized":
        return await session.post(
            url + "/v1/classify",
            data=b"\0" * (9 * 1024 * 1024),
            headers={"content-type": "image/png"},
        )
    if kind == "too-many":
        form = aiohttp.FormData()
        for i in range(80):
            form.add_field("file", img, filename=f"{i}.png")
        return await session.post(url + "/v1/classify", data=form)
    raise ValueError(kind)


MIX = ["classify"] * 50 + ["multi"] * 15 + ["embed-json"] * 15 + ["garbage"] * 8 + \
    ["truncated"] * 6 + ["oversized"] * 3 + ["too-many"] * 3  # fmt: skip


async def soak(url: str, seconds: float, concurrency: int) -> tuple[Counter[int], list[float]]:
    c = corpus()
    codes: Counter[int] = Counter()
    latencies: list[float] = []
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    r = await one(s, url, random.choice(MIX), c)
                    await r.read()
                    codes[r.status] += 1
                    r.release()
                except aiohttp.ClientError:
                    codes[-1] += 1  # connection-level failure
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes, latencies


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    args = p.parse_args()
    random.seed(0)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {**os.environ, "RESNET_SERVE_LOG_LEVEL": "warning", "RESNET_SERVE_ACCESS_LOG": "false"}
    cmd = [sys.executable, "-m", "resnet_serve.service.cli", "--repository", str(args.repository),
           "--models", args.model, "--port", str(port),
           "--max-body-bytes", str(args.max_body_bytes)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        for _ in range(300):
            try:
                if urllib.request.urlopen(url + "/readyz").status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        # A short warm-up so that the start figure is the steady state, not the empty process.
        asyncio.run(soak(url, 10, args.concurrency))
        start = rss_mib(proc.pid)
        t = time.time()
        codes, lat = asyncio.run(soak(url, args.minutes * 60, args.concurrency))
        end = rss_mib(proc.pid)
        elapsed = time.time() - t
        q = np.percentile(np.array(lat) * 1000, [50, 99])
        n = sum(codes.values())
        print(f"duration: {elapsed:.0f} s, requests: {n}, concurrency: {args.concurrency}")
        growth = 100 * (end - start) / start
        print(f"resident memory: start {start:.1f} MiB, end {end:.1f} MiB, growth {growth:+.1f}%")
        print("answers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())))
        print(f"latency p50 {q[0]:.1f} ms, p99 {q[1]:.1f} ms")
        healthy = urllib.request.urlopen(url + "/readyz").status == 200
        print(f"ready at the end: {healthy}")
        ok = (
            healthy
            and end < start * 1.10
            and not any(code >= 500 and code != 503 for code in codes)
        )
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    raise SystemExit(main())
