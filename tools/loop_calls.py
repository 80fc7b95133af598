"""How many Python function calls one request costs the event loop's thread, and whose:
resnet-serve (one process) or the floor peer (bench/peers/floor.py) under cProfile, loaded
with closed-loop clients, one image per request as a multipart ``file`` part.

    python -m tools.loop_calls --repository /tmp/perf-repo --model resnet20_cifar10 \\
        --images ../shared/data/cifar10-test-846.npz [--floor] [--server-arg "..."]

cProfile sees the thread that enabled it, the one that runs the event loop (decoding and
onnxruntime run on other threads and are not counted). Its timings are inflated by the
profiling itself, in proportion to the calls made, so the figure printed is calls per
request, by file: where the loop's Python goes, not what it costs (small calls cost less
than a coroutine's; docs/benchmarks.md, eighth session). The profile is dumped on
SIGUSR1, so that the server's own exit path (which may skip the interpreter's teardown)
does not matter. ``--cpu``: no profiler; the event loop
thread's CPU per request and the other threads', from ``/proc/PID/task/*/stat``; with
``--workers N`` (``--cpu`` only) N serving processes (``resnet-serve --workers N``, the
floor's ``--workers N``), their event loop threads summed, and every other thread of the
process tree (decoding, onnxruntime, the supervisor) counted as the others.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import pstats
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from resnet_serve.bench.corpus import from_path, image_type, load
from resnet_serve.bench.load import MULTIPART_TYPE, children, multipart_body
from tools.perf_analyzer import cpu_line, free_port, wait_ready
from tools.request_cost import thread_cpu_seconds

BOOT = """
import cProfile, signal, sys
state = {"profile": cProfile.Profile()}
def restart(*_):  # SIGUSR2: count from now
    state["profile"].disable()
    state["profile"] = cProfile.Profile()
    state["profile"].enable()
def dump(*_):  # SIGUSR1: stop counting, write the profile
    state["profile"].disable()
    state["profile"].dump_stats(sys.argv[1])
if sys.argv[1] != "-":  # "-": --cpu, no profiler
    signal.signal(signal.SIGUSR2, restart)
    signal.signal(signal.SIGUSR1, dump)
    state["profile"].enable()
if sys.argv[2] == "floor":
    from pathlib import Path
    from resnet_serve.bench.peers import floor
    floor.serve(Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), 1)
else:
    from resnet_serve.service.cli import main
    main(sys.argv[3:])
"""
# Load before the count starts: connections open, every path taken once.
WARMUP_S = 2.0


def processes(pid: int) -> list[int]:
    """``pid`` and its descendants (a child started by any of its threads)."""
    return [pid, *(p for child in children(pid) for p in processes(child))]


def tree_cpu_seconds(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds by (process, thread) over ``pid``'s tree; a process that has children
    (a supervisor) is keyed by thread -1, so that only serving processes' main threads
    (their event loops) are keyed by their own pid."""
    out: dict[tuple[int, int], float] = {}
    for proc in processes(pid):
        leaf = not children(proc)
        with contextlib.suppress(OSError):  # the process ended meanwhile
            for tid, seconds in thread_cpu_seconds(proc).items():
                key = (proc, tid if leaf else -1)
                out[key] = out.get(key, 0.0) + seconds
    return out


async def drive(
    url: str,
    pid: int,
    bodies: list[tuple[bytes, str]],
    clients: int,
    seconds: float,
    profile: bool,
) -> tuple[int, float, float]:
    """Closed-loop clients; the server's profile (``profile``) restarted after the warm-up
    and dumped ``seconds`` later. The requests answered in between (every answer must be a
    200), and the CPU seconds the event loop's thread and the others took meanwhile."""
    done = 0
    stop = False
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as s:

        async def client(i: int) -> None:
            nonlocal done
            k = i
            while not stop:
                body, content_type = bodies[k % len(bodies)]
                async with s.post(url, data=body, headers={"content-type": content_type}) as r:
                    await r.read()
                    if r.status != 200:
                        raise SystemExit(f"{r.status}: {await r.text()}")
                done += 1
                k += clients

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.sleep(WARMUP_S)
        if profile:
            os.kill(pid, signal.SIGUSR2)
        first, before = done, tree_cpu_seconds(pid)
        await asyncio.sleep(seconds)
        if profile:
            os.kill(pid, signal.SIGUSR1)
        counted, after = done - first, tree_cpu_seconds(pid)
        stop = True
        await asyncio.gather(*tasks)
    # A serving process's main thread runs its event loop.
    spent = {key: v - before.get(key, 0.0) for key, v in after.items()}
    loop_s = sum(v for (proc, tid), v in spent.items() if proc == tid)
    return counted, loop_s, sum(spent.values()) - loop_s


def calls_by_file(stats: pstats.Stats, requests: int) -> tuple[float, list[tuple[str, float]]]:
    """Python-level function calls per request (builtins left out), and by source file."""
    by: collections.Counter[str] = collections.Counter()
    for (filename, _, _), (_, calls, _, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename.startswith("~"):  # a builtin: a C call, not Python work of its own
            continue
        for marker in ("site-packages/", "/resnet_serve/", "/work/main/", "python3.11/"):
            filename = filename.split(marker)[-1]
        by[filename] += calls
    total = sum(by.values()) / requests
    return total, [(name, n / requests) for name, n in by.most_common()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", type=Path, help="an .npz or folder (default: the photos)")
    ap.add_argument("--floor", action="store_true", help="profile the floor peer instead")
    ap.add_argument("--server-arg", default="", help="resnet-serve options")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--cpu", action="store_true",
        help="no profiler: the event loop thread's CPU per request, and the other threads'",
    )  # fmt: skip
    ap.add_argument(
        "--workers", type=int, default=1, help="serving processes (with --cpu when over 1)"
    )
    ap.add_argument(
        "--raw", action="store_true",
        help="each image as the raw body (its image/* type) instead of a multipart part",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.workers > 1 and not args.cpu:
        ap.error("--workers over 1 needs --cpu (the profile is of one process)")
    images = from_path(args.images) if args.images else load()
    if args.raw:
        bodies = [(im, image_type(im)[1]) for im in images]
    else:
        bodies = [(multipart_body([im]), MULTIPART_TYPE) for im in images]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="loop-calls-") as tmp:
        out = Path(tmp) / "loop.prof"
        if args.floor:
            model_dir = args.repository / args.model
            argv_ = ["floor", str(model_dir), str(port), tmp]
            url, ready = f"http://127.0.0.1:{port}/classify", "/health"
            if args.workers > 1:  # as resnet-bench starts it, the intra-op split included
                argv_ = [
                    "-m", "resnet_serve.bench.peers.floor", "--model-dir", str(model_dir),
                    "--port", str(port), "--workdir", tmp, "--workers", str(args.workers),
                ]  # fmt: skip
        else:
            argv_ = [
                "service", "--repository", str(args.repository), "--models", args.model,
                "--port", str(port), "--tuning", "off", "--log-level", "warning",
                "--grpc-port", "0", "--workers", str(args.workers),
                *shlex.split(args.server_arg),
            ]  # fmt: skip
            url = f"http://127.0.0.1:{port}/v1/classify"
            ready = "/readyz"
        with (Path(tmp) / "server.log").open("wb") as log:
            boot = ["-c", BOOT, "-" if args.cpu else str(out)] if argv_[0] != "-m" else []
            proc = subprocess.Popen(
                [sys.executable, *boot, *argv_],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, 300, path=ready)
            requests, loop_s, other_s = asyncio.run(
                drive(url, proc.pid, bodies, args.clients, args.seconds, not args.cpu)
            )
            if not args.cpu:
                deadline = time.monotonic() + 60
                while not out.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)  # written whole
                stats = pstats.Stats(str(out))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    who = "the floor peer" if args.floor else f"resnet-serve {args.server_arg}".strip()
    who += f", {args.workers} processes" if args.workers > 1 else ""
    print(f"# machine: {cpu_line()}")
    if args.cpu:
        plural = "s" if args.workers > 1 else ""
        print(
            f"{who}, {args.model}, {args.clients} clients, {args.seconds:g} s: "
            f"{requests / args.seconds:.0f} requests/s, event loop thread{plural} "
            f"{1e6 * loop_s / requests:.1f} us CPU per request, other threads "
            f"{1e6 * other_s / requests:.1f} us"
        )
        return 0
    total, rows = calls_by_file(stats, requests)
    print(
        f"{who}, {args.model}, {args.clients} clients, {args.seconds:g} s, {requests} requests "
        f"({requests / args.seconds:.0f}/s under the profiler): {total:.1f} Python function "
        "calls per request on the event loop's thread"
    )
    for name, calls in rows[: args.top]:
        print(f"  {calls:7.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
