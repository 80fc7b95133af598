"""The figures of docs/deployment.md ("Image size and cold start"): an image's layers as
`docker history` gives them, and the time from `docker run` to a 200 from /readyz.

    tools/docker_engine.sh start          # the engine (root)
    python tools/image_figures.py resnet-serve:test-cpu [--runs 5]

Uses the engine of tools/docker_engine.sh; containers run as the tests run them (host
network, 127.0.0.1, a free port, --read-only) and are removed. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_env() -> dict[str, str]:
    out = subprocess.run([str(ROOT / "tools" / "docker_engine.sh"), "env"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return {**os.environ, **dict(line.split("=", 1) for line in out.splitlines())}


def docker(env: dict[str, str], *args: str) -> str:
    return subprocess.run(["docker", *args], env=env, check=True, capture_output=True,
                          text=True, timeout=300).stdout  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_to_ready(env: dict[str, str], image: str, timeout_s: float = 120) -> float:
    port = free_port()
    start = time.perf_counter()
    cid = docker(env, "run", "-d", "--read-only", "--network", "host",
                 "-e", "RESNET_SERVE_HOST=127.0.0.1", "-e", f"RESNET_SERVE_PORT={port}",
                 image).strip()  # fmt: skip
    try:
        while not ready(f"http://127.0.0.1:{port}/readyz"):
            if time.perf_counter() - start > timeout_s:
                raise SystemExit(f"{image}: not ready in {timeout_s:.0f}s")
            time.sleep(0.02)
        return time.perf_counter() - start
    finally:
        docker(env, "rm", "-f", cid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    env = engine_env()
    rows = docker(env, "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}",
                  args.image).splitlines()  # fmt: skip
    print(f"`docker history {args.image}` (layers with content, newest first):\n")
    print("| size | created by |\n|---:|---|")
    for row in rows:
        size, _, created = row.partition("\t")
        if size not in ("0B", "0"):
            text = " ".join(created.replace("|", "\\|").split())
            print(f"| {size} | `{text[:110]}{'...' if len(text) > 110 else ''}` |")
    total = docker(env, "image", "inspect", "--format", "{{.Size}}", args.image).strip()
    print(f"\ntotal: {int(total) / 1e6:.0f} MB\n")
    times = [run_to_ready(env, args.image) for _ in range(args.runs)]
    print(
        f"`docker run` to /readyz 200, {args.runs} runs: median {statistics.median(times):.2f} s"
        f" (min {min(times):.2f}, max {max(times):.2f})"
    )
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                  if ln.startswith("Model name")), "?")  # fmt: skip
    print(f"\nmachine: {model}, {os.cpu_count()} CPUs (lscpu)")


if __name__ == "__main__":
    main()
