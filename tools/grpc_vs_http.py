"""V2 gRPC against V2 HTTP (binary tensor data) for the same preprocessed UINT8 batches,
in the same run against the same ``resnet-serve`` process, with Triton's own clients.

    python tools/grpc_vs_http.py --repository model_repository --model resnet20_cifar10

For each batch size and concurrency it sends identical requests for ``--seconds`` through
``tritonclient.http`` (binary data in and out) and ``tritonclient.grpc`` (raw contents,
what it always sends), alternating the protocols run by run, and prints a Markdown table:
images/s and the median latency of each, with this machine's CPU.
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from resnet_serve.bench.servers import start_service
from resnet_serve.contract.schema import load_model_spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        flags = fields.get("Flags", "").split()
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
        return f"{fields['Model name'].strip()}, {fields['CPU(s)'].strip()} CPUs, {' '.join(isa)}"
    except (OSError, subprocess.CalledProcessError, KeyError):
        return platform.processor() or "unknown CPU"


def run(protocol: str, url: str, model: str, batch: np.ndarray, threads: int, seconds: float):  # type: ignore[no-untyped-def]
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker() -> None:
        client = client_lib.InferenceServerClient(url)
        inp = client_lib.InferInput("images", list(batch.shape), "UINT8")
        if protocol == "grpc":
            inp.set_data_from_numpy(batch)
            outs = [client_lib.InferRequestedOutput("logits")]
        else:
            inp.set_data_from_numpy(batch, binary_data=True)
            outs = [client_lib.InferRequestedOutput("logits", binary_data=True)]
        mine = []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            client.infer(model, [inp], outputs=outs)
            mine.append(time.perf_counter() - t)
        client.close()
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    return len(latencies) * len(batch) / elapsed, statistics.median(latencies) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2, help="runs of each protocol, alternated")
    args = p.parse_args()
    spec = load_model_spec(args.repository / args.model)
    grpc_port = free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_service(args.repository, args.model, ["--grpc-port", str(grpc_port)], log)
    http_url = server.url.removeprefix("http://")
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu()}; model {args.model}; {args.seconds:g} s per run, best of {args.rounds}\n")
    print("| batch | clients | HTTP binary images/s | gRPC images/s | HTTP p50 ms | gRPC p50 ms |")
    print("|---|---|---|---|---|---|")
    try:
        for b in map(int, args.batches.split(",")):
            batch = rng.integers(0, 256, (b, *spec.input_shape), dtype=np.uint8)
            for c in map(int, args.concurrency.split(",")):
                best = {"http": (0.0, 0.0), "grpc": (0.0, 0.0)}
                for _ in range(args.rounds):
                    for proto, url in (("http", http_url), ("grpc", f"127.0.0.1:{grpc_port}")):
                        got = run(proto, url, args.model, batch, c, args.seconds)
                        if got[0] > best[proto][0]:
                            best[proto] = got
                (h, hl), (g, gl) = best["http"], best["grpc"]
                print(f"| {b} | {c} | {h:.0f} | {g:.0f} | {hl:.2f} | {gl:.2f} |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
