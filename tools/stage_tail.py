"""Where a lone client's slow requests lose their time: one keep-alive connection sends
resnet-bench's photos one at a time to a running service, and each answer's
``Server-Timing`` (queue, preprocess, inference: service/timing.py) is set against its
latency. Prints the latency percentiles, then each stage's median over all requests and
over the slowest 5%.

    python -m tools.stage_tail --url http://127.0.0.1:8000 --model resnet50 --requests 400

Used to find what made ResNet-50's one-client p99 half again its median: the inference
stage of the slow requests (docs/benchmarks.md, "Pinned sessions").
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import time
from urllib.parse import urlsplit

import numpy as np

from resnet_serve.bench import corpus
from resnet_serve.bench.corpus import image_type
from tools.perf_analyzer import cpu_line


def server_timing(header: str) -> dict[str, float]:
    """``{stage: ms}`` from a ``Server-Timing`` value (``name;dur=1.2, ...``)."""
    out = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                out[name] = float(value)
    return out


def measure(
    url: str, model: str, images: list[bytes], requests: int, warmup: int = 20
) -> list[tuple[float, dict[str, float]]]:
    """``(latency ms, stages)`` of ``requests`` requests sent one after another."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80)
    path = f"/v1/models/{model}/classify"
    rows = []
    try:
        for i in range(warmup + requests):
            data = images[i % len(images)]
            start = time.perf_counter()
            conn.request("POST", path, body=data, headers={"Content-Type": image_type(data)[1]})
            resp = conn.getresponse()
            resp.read()
            latency = (time.perf_counter() - start) * 1000
            if resp.status != 200:
                raise SystemExit(f"HTTP {resp.status} from {url}{path}")
            if i >= warmup:
                rows.append((latency, server_timing(resp.getheader("Server-Timing") or "")))
    finally:
        conn.close()
    return rows


def summary(rows: list[tuple[float, dict[str, float]]]) -> str:
    latencies = np.array([r[0] for r in rows])
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    slow = sorted(rows, key=lambda r: -r[0])[: max(1, len(rows) // 20)]
    stages = sorted({k for _, s in rows for k in s})
    lines = [
        f"{len(rows)} requests: latency p50 {p50:.1f} ms, p95 {p95:.1f}, p99 {p99:.1f}",
        "",
        "| stage | median ms, all | median ms, slowest 5% |",
        "|---|---:|---:|",
    ]
    for k in [*stages, "latency"]:

        def pick(r: tuple[float, dict[str, float]], k: str = k) -> float:
            return r[0] if k == "latency" else r[1].get(k, 0.0)

        all_ms = statistics.median(pick(r) for r in rows)
        slow_ms = statistics.median(pick(r) for r in slow)
        lines.append(f"| {k} | {all_ms:.2f} | {slow_ms:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=400)
    args = p.parse_args()
    print(f"# {cpu_line()}")
    print(summary(measure(args.url, args.model, corpus.load(), args.requests)))


if __name__ == "__main__":
    main()
