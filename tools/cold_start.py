"""Cold start, measured as an operator sees it: `resnet-serve` is started as a process and
timed until /healthz and /readyz answer, then the first request is compared with warm ones.

    python tools/cold_start.py --repository /tmp/r --models resnet50 --runs 3
    python tools/cold_start.py --repository /tmp/r --models resnet20_cifar10,resnet50

Prints a markdown table (docs/benchmarks.md, "Cold start"): per run, seconds from spawn to
/healthz and to /readyz, the server's own resnet_serve_time_to_ready_seconds, the first
request's latency and the median of the next ones (one image of the model's crop size
plus a margin, as PNG), and their ratio. Also in-process: each batch size's first and
second onnxruntime run on a fresh session, to show what the CPU provider needs warmed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def post_png(url: str, body: bytes) -> float:
    req = urllib.request.Request(url, data=body, headers={"content-type": "image/png"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        assert r.status == 200
    return time.perf_counter() - t


def cpu() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", text, re.M) or ["", ""])[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    name = model[1] if model else platform.processor()
    return f"{name}, {os.cpu_count()} CPUs, {', '.join(isa)}"


def image_for(repository: Path, model: str) -> bytes:
    meta = json.loads((repository / model / "model.json").read_text())
    side = int(meta["preprocess"]["resize"]) + 16
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize((side, side), Image.BILINEAR).save(buf, "PNG")
    return buf.getvalue()


def one_run(repository: Path, models: list[str], warm_requests: int) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RESNET_SERVE_LOG_LEVEL": "warning"}
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "resnet_serve.service.cli", "--repository", str(repository),
             "--models", ",".join(models), "--port", str(port),
             # No background tuning after ready: it would share the CPU with what is timed.
             "--tuning", "off"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        try:
            healthy = ready = None
            while ready is None:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"resnet-serve exited:\n{log.read().decode()}")
                if healthy is None and get(url + "/healthz", 1)[0] == 200:
                    healthy = time.perf_counter() - t0
                if healthy is not None and get(url + "/readyz", 1)[0] == 200:
                    ready = time.perf_counter() - t0
                time.sleep(0.01)
            metrics = get(url + "/metrics")[1].decode()
            found = re.search(r"^resnet_serve_time_to_ready_seconds (\S+)$", metrics, re.M)
            server_ready = float(found[1]) if found else float("nan")
            body = image_for(repository, models[0])
            endpoint = f"{url}/v1/models/{models[0]}/classify"
            infer0 = server_seconds(url, INFERENCE)  # warmup and self-check runs excluded
            first = post_png(endpoint, body)
            server_first = server_seconds(url)
            infer_first = server_seconds(url, INFERENCE) - infer0
            warm = statistics.median(post_png(endpoint, body) for _ in range(warm_requests))
            server_warm = (server_seconds(url) - server_first) / warm_requests
            infer_warm = (server_seconds(url, INFERENCE) - infer0 - infer_first) / warm_requests
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    assert healthy is not None
    return {
        "healthz_s": healthy,
        "readyz_s": ready,
        "server_time_to_ready_s": server_ready,
        "first_ms": first * 1000,
        "warm_ms": warm * 1000,
        "server_first_ms": server_first * 1000,
        "server_warm_ms": server_warm * 1000,
        "infer_first_ms": infer_first * 1000,
        "infer_warm_ms": infer_warm * 1000,
    }


REQUESTS = (
    r'^resnet_serve_request_duration_seconds_sum\{endpoint="classify"[^}]*'
    r'status_class="2xx"[^}]*\} (\S+)$'
)
INFERENCE = r"^resnet_serve_inference_duration_seconds_sum\{[^}]*\} (\S+)$"


def server_seconds(url: str, pattern: str = REQUESTS) -> float:
    """A sum the server keeps (by default its time on successful classify requests so far:
    what it spent, without the client's connection and parsing)."""
    text = get(url + "/metrics")[1].decode()
    return sum(float(m[1]) for m in re.finditer(pattern, text, re.M))


def first_runs(repository: Path, model: str, sizes: list[int]) -> list[tuple[int, float, float]]:
    """(batch, first run ms, second run ms), each size on a fresh session."""
    import onnxruntime as ort

    meta = json.loads((repository / model / "model.json").read_text())
    crop = int(meta["preprocess"]["crop"])
    out = []
    for b in sizes:
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(
            str(repository / model / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        x = np.zeros((b, crop, crop, 3), np.uint8)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            s.run(None, {"images": x})
            times.append((time.perf_counter() - t) * 1000)
        out.append((b, times[0], min(times[1:])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--models", required=True, help="comma-separated; the first is requested")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warm-requests", type=int, default=20)
    p.add_argument("--first-run-sizes", default="1,2,7,8,16,32", help="'' to skip")
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    print(f"- machine: {cpu()}")
    print(f"- command: python tools/cold_start.py {' '.join(sys.argv[1:])}\n")
    print("| run | /healthz (s) | /readyz (s) | server time_to_ready (s) | first request (ms) "
          "| warm median (ms) | first / warm | server: first (ms) "
          "| server: warm mean (ms) | inference: first / warm mean (ms) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i in range(args.runs):
        r = one_run(args.repository, models, args.warm_requests)
        print(
            f"| {i + 1} | {r['healthz_s']:.2f} | {r['readyz_s']:.2f} | "
            f"{r['server_time_to_ready_s']:.2f} | {r['first_ms']:.1f} | {r['warm_ms']:.1f} | "
            f"{r['first_ms'] / r['warm_ms']:.2f} | {r['server_first_ms']:.1f} | "
            f"{r['server_warm_ms']:.1f} | {r['infer_first_ms']:.2f} / {r['infer_warm_ms']:.2f} |",
            flush=True,
        )
    if args.first_run_sizes:
        sizes = [int(s) for s in args.first_run_sizes.split(",")]
        print(f"\nFresh onnxruntime session per batch size ({models[0]}, CPU provider):\n")
        print("| batch | first run (ms) | later run (ms) | first / later |")
        print("|---:|---:|---:|---:|")
        for b, first, later in first_runs(args.repository, models[0], sizes):
            print(f"| {b} | {first:.1f} | {later:.1f} | {first / later:.2f} |")


if __name__ == "__main__":
    main()
