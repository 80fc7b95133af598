"""What one request costs the server in CPU, apart from the model: the tiny test model
(tests/service/tiny.py: a few arithmetic ops on 8x8 images), so that what is measured is
HTTP, parsing, the framework, the core, decoding hand-offs and the answer.

    python -m tools.request_cost --variant 'before|PYTHONPATH=/tmp/oldpkg' --variant 'after' \\
        --rounds 3 --seconds 5 --clients 16 [--server-arg '--workers 1']

Variants as in ``tools.ab_serve`` (``NAME|ENV=VALUE ...|options``), all started at once,
measured in turn, the order rotating by round. Three bodies: a raw 8x8 PNG (268 bytes), a
raw JPEG photo from resnet-bench's corpus (47 KB, decoded with draft to 8x8) and the same
JPEG as one multipart ``file`` part (what resnet-bench sends). Closed-loop aiohttp clients,
one keep-alive connection each. Per request: the server's event loop thread's CPU time and
its other threads' (decoding, onnxruntime, the batcher), from ``/proc/PID/task/*/stat``.
Medians over the rounds; every figure printed with the machine.

``--profile DIR``: py-spy (``pip install py-spy``) records each variant's server during
its first PNG measurement (non-blocking, 500 Hz) to ``DIR/NAME.txt``, and the event loop
thread's hottest frames are printed (``tools/profile_summary.py --event-loop``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from resnet_serve.bench import corpus
from resnet_serve.bench.load import MULTIPART_TYPE, multipart_body
from tests.service import tiny
from tools import profile_summary
from tools.ab_serve import Variant, rotation, running
from tools.grpc_http_pairs import cpu_seconds
from tools.perf_analyzer import cpu_line


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            out[int(task.name)] = cpu_seconds(pid, int(task.name))
    return out


async def load(  # type: ignore[no-untyped-def]
    url: str, pid: int, clients: int, seconds: float, body: bytes, ctype: str,
    profile: Path | None = None,
):  # fmt: skip
    done = 0
    stop = False
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as s:

        async def client() -> None:
            nonlocal done
            while not stop:
                async with s.post(url, data=body, headers={"content-type": ctype}) as r:
                    await r.read()
                    if r.status != 200:
                        raise SystemExit(f"{r.status}: {await r.text()}")
                    done += 1

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(1.0)  # connections open, batches formed
        n0, c0, t0 = done, thread_cpu_seconds(pid), time.perf_counter()
        spy = None
        if profile is not None:
            spy = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(pid), "--nonblocking", "-r", "500",
                "-d", str(max(1, int(seconds))), "-f", "raw", "-o", str(profile),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        await asyncio.sleep(seconds)
        n1, c1, t1 = done, thread_cpu_seconds(pid), time.perf_counter()
        stop = True
        await asyncio.gather(*tasks)
        if spy is not None:
            await spy.wait()
    n = n1 - n0
    loop_ms = 1000 * (c1[pid] - c0.get(pid, 0.0)) / n
    other_ms = 1000 * sum(v - c0.get(t, 0.0) for t, v in c1.items() if t != pid) / n
    return n / (t1 - t0), loop_ms, other_ms


def bodies() -> dict[str, tuple[bytes, str]]:
    png = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (tiny.CROP, tiny.CROP, 3), np.uint8)
    Image.fromarray(pixels).save(png, "PNG")
    jpeg = corpus.load()[0]  # resnet-bench's default corpus, its first photo
    return {
        "png 8x8, raw": (png.getvalue(), "image/png"),
        f"jpeg {len(jpeg) // 1024} KB, raw": (jpeg, "image/jpeg"),
        f"jpeg {len(jpeg) // 1024} KB, multipart": (multipart_body([jpeg]), MULTIPART_TYPE),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, type=Variant.parse)
    ap.add_argument("--server-arg", default="", help="options every variant's server gets")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", type=Path, help="a folder for py-spy profiles")
    args = ap.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    variants: list[Variant] = args.variant
    print(f"# machine: {cpu_line()}; load average before: {os.getloadavg()[0]:.2f}")
    kinds = bodies()
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="request-cost-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        tiny.export(repo)
        options = ["--repository", str(repo), "--tuning", "off", *shlex.split(args.server_arg)]
        with running(variants, options, Path(tmp)):
            for r, v in rotation(variants, args.rounds):
                assert v.proc is not None
                url = f"http://127.0.0.1:{v.port}/v1/models/{tiny.NAME}/classify"
                for k, (kind, (body, ctype)) in enumerate(kinds.items()):
                    spy = None
                    if args.profile is not None and r == 0 and k == 0:
                        spy = args.profile / f"{v.name}.txt"
                    got = asyncio.run(
                        load(url, v.proc.pid, args.clients, args.seconds, body, ctype, spy)
                    )
                    results.setdefault((v.name, kind), []).append(got)
    print(
        f"\ntiny model, {args.clients} clients, {args.seconds:g} s per measurement, "
        f"{args.rounds} rounds, server options: {args.server_arg or '(defaults)'}; "
        f"load average after: {os.getloadavg()[0]:.2f}\n"
    )
    print("| body | variant | req/s (median; rounds) | event loop ms CPU / request | "
          "other threads ms CPU / request |")  # fmt: skip
    print("|---|---|---|---:|---:|")
    for kind in kinds:
        for v in variants:
            runs = results[(v.name, kind)]
            rates = [x[0] for x in runs]
            print(
                f"| {kind} | {v.name} | {statistics.median(rates):.0f}; "
                f"{', '.join(f'{x:.0f}' for x in rates)} "
                f"| {statistics.median(x[1] for x in runs):.3f} "
                f"| {statistics.median(x[2] for x in runs):.3f} |"
            )
    if args.profile is not None:
        for v in variants:
            print(f"\n{v.name}, png 8x8 raw, round 1:")
            profile_summary.main([str(args.profile / f"{v.name}.txt"), "--event-loop"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
