"""Cold start, measured as an operator sees it: `resnet-serve` is started as a process and
timed until /healthz and /readyz answer, then the first request is compared with warm ones.

    python tools/cold_start.py --repository /tmp/r --models resnet50 --runs 3
    python tools/cold_start.py --repository /tmp/r --models resnet20_cifar10,resnet50

Prints a markdown table (docs/benchmarks.md, "Cold start"): per run, seconds from spawn to
/healthz and to /readyz, the server's own resnet_serve_time_to_ready_seconds, the first
request's latency and the median of the next ones (one image of the model's crop size
plus a margin, as PNG), and their ratio. Also in-process: each batch size's first and
second onnxruntime run on a fresh session, to show what the CPU provider needs warmed.

A request that follows an idle spell is slower than one sent straight after another, on
any server: threads asleep, the vCPUs halted, caches cold (on the 2-vCPU KVM machines of
docs/benchmarks.md, "Cold start": 2-3x for ResNet-20 after 200 ms of quiet, FastAPI +
onnxruntime alike). So the first request is sent ``--idle-ms`` after /readyz, and compared with warm
requests each sent after the same pause ("after idle") as well as back to back: what is
left of first / after-idle is the first request's own one-time cost. ``--baseline`` does
the same for FastAPI + onnxruntime (bench/baseline_ort.py) on the same model.
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


BOUNDARY = "cold-start-3f9a"


def multipart(body: bytes) -> bytes:
    """``body`` as the one ``file`` part of a multipart form (the baseline's input)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    return head.encode() + body + f"\r\n--{BOUNDARY}--\r\n".encode()


def post_png(url: str, body: bytes, pause_s: float = 0.0) -> float:
    """Seconds for one request on a new connection, sent ``pause_s`` after the call."""
    kind = "multipart/form-data; boundary=" + BOUNDARY if body.startswith(b"--") else "image/png"
    req = urllib.request.Request(url, data=body, headers={"content-type": kind})
    time.sleep(pause_s)
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


def one_run(
    repository: Path, models: list[str], warm_requests: int, idle_s: float
) -> dict[str, float]:
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
            first = post_png(endpoint, body, idle_s)
            server_first = server_seconds(url)
            infer_first = server_seconds(url, INFERENCE) - infer0
            warm = statistics.median(post_png(endpoint, body) for _ in range(warm_requests))
            server_warm = (server_seconds(url) - server_first) / warm_requests
            infer_warm = (server_seconds(url, INFERENCE) - infer0 - infer_first) / warm_requests
            idle = statistics.median(
                post_png(endpoint, body, idle_s) for _ in range(max(3, warm_requests // 4))
            )
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
        "idle_ms": idle * 1000,
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


def baseline_run(repository: Path, model: str, warm_requests: int, idle_s: float) -> dict:
    """The same requests against FastAPI + onnxruntime (bench/baseline_ort.py)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "BASELINE_MODEL_DIR": str(repository / model)}
    command = [sys.executable, "-m", "uvicorn", "resnet_serve.bench.baseline_ort:app_from_env",
               "--factory", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    with subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.DEVNULL) as proc:
        try:
            while get(url + "/healthz", 1)[0] != 200:
                if proc.poll() is not None:
                    raise SystemExit("the baseline exited")
                time.sleep(0.01)
            body = multipart(image_for(repository, model))
            first = post_png(url + "/classify", body, idle_s)
            warm = statistics.median(
                post_png(url + "/classify", body) for _ in range(warm_requests)
            )
            idle = statistics.median(
                post_png(url + "/classify", body, idle_s) for _ in range(max(3, warm_requests // 4))
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return {"first_ms": first * 1000, "warm_ms": warm * 1000, "idle_ms": idle * 1000}


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


def idle_runs(
    repository: Path, model: str, gaps_s: list[float], repeats: int = 6
) -> list[tuple[str, float, list[float]]]:
    """(spinning, back-to-back ms, ms after each gap): onnxruntime batch-1 runs on a warm
    session with the service's thread count, each run after ``gap`` of sleep (median of
    ``repeats``), with its threads spinning between ops and without."""
    import onnxruntime as ort

    meta = json.loads((repository / model / "model.json").read_text())
    crop = int(meta["preprocess"]["crop"])
    x = np.zeros((1, crop, crop, 3), np.uint8)
    out = []
    for spin in ("1", "0"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        s = ort.InferenceSession(
            str(repository / model / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )

        def run(pause: float, s: ort.InferenceSession = s) -> float:
            time.sleep(pause)
            t = time.perf_counter()
            s.run(None, {"images": x})
            return (time.perf_counter() - t) * 1000

        for _ in range(5):
            run(0)
        warm = statistics.median(run(0) for _ in range(20))
        after = [statistics.median(run(g) for _ in range(repeats)) for g in gaps_s]
        out.append(("on" if spin == "1" else "off", warm, after))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--models", required=True, help="comma-separated; the first is requested")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warm-requests", type=int, default=20)
    p.add_argument("--first-run-sizes", default="1,2,7,8,16,32", help="'' to skip")
    p.add_argument(
        "--idle-ms", type=float, default=200.0,
        help="quiet before the first request, and before each after-idle one",
    )  # fmt: skip
    p.add_argument(
        "--idle-gaps-ms", default="10,50,200,1000",
        help="in-process: onnxruntime runs after these pauses, spinning on and off ('' to skip)",
    )  # fmt: skip
    p.add_argument(
        "--baseline", action="store_true",
        help="also FastAPI + onnxruntime on the first model, the same requests",
    )  # fmt: skip
    args = p.parse_args()
    idle_s = args.idle_ms / 1000
    models = [m for m in args.models.split(",") if m]
    print(f"- machine: {cpu()}")
    print(f"- command: python tools/cold_start.py {' '.join(sys.argv[1:])}\n")
    print("| run | /healthz (s) | /readyz (s) | server time_to_ready (s) | first request (ms) "
          "| warm median (ms) | first / warm | after idle median (ms) | first / after idle "
          "| server: first (ms) | server: warm mean (ms) "
          "| inference: first / warm mean (ms) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i in range(args.runs):
        r = one_run(args.repository, models, args.warm_requests, idle_s)
        print(
            f"| {i + 1} | {r['healthz_s']:.2f} | {r['readyz_s']:.2f} | "
            f"{r['server_time_to_ready_s']:.2f} | {r['first_ms']:.1f} | {r['warm_ms']:.1f} | "
            f"{r['first_ms'] / r['warm_ms']:.2f} | {r['idle_ms']:.1f} | "
            f"{r['first_ms'] / r['idle_ms']:.2f} | {r['server_first_ms']:.1f} | "
            f"{r['server_warm_ms']:.1f} | {r['infer_first_ms']:.2f} / {r['infer_warm_ms']:.2f} |",
            flush=True,
        )
    if args.baseline:
        print(f"\nFastAPI + onnxruntime ({models[0]}), the same requests as multipart:\n")
        print("| run | first request (ms) | warm median (ms) | first / warm "
              "| after idle median (ms) | first / after idle |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|")
        for i in range(args.runs):
            r = baseline_run(args.repository, models[0], args.warm_requests, idle_s)
            print(
                f"| {i + 1} | {r['first_ms']:.1f} | {r['warm_ms']:.1f} | "
                f"{r['first_ms'] / r['warm_ms']:.2f} | {r['idle_ms']:.1f} | "
                f"{r['first_ms'] / r['idle_ms']:.2f} |",
                flush=True,
            )
    if args.first_run_sizes:
        sizes = [int(s) for s in args.first_run_sizes.split(",")]
        print(f"\nFresh onnxruntime session per batch size ({models[0]}, CPU provider):\n")
        print("| batch | first run (ms) | later run (ms) | first / later |")
        print("|---:|---:|---:|---:|")
        for b, first, later in first_runs(args.repository, models[0], sizes):
            print(f"| {b} | {first:.1f} | {later:.1f} | {first / later:.2f} |")
    if args.idle_gaps_ms:
        gaps = [float(g) for g in args.idle_gaps_ms.split(",")]
        print(f"\nonnxruntime batch 1 after a pause ({models[0]}, in-process, median ms):\n")
        print(
            "| threads spin | back to back | " + " | ".join(f"after {g:g} ms" for g in gaps) + " |"
        )
        print("|---|---:|" + "---:|" * len(gaps))
        for spin, warm, after in idle_runs(args.repository, models[0], [g / 1000 for g in gaps]):
            print(f"| {spin} | {warm:.1f} | " + " | ".join(f"{a:.1f}" for a in after) + " |")


if __name__ == "__main__":
    main()
