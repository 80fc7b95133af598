"""V2 gRPC against V2 HTTP (binary tensor data) with Triton's C++ client, perf_analyzer,
in paired rounds against one `resnet-serve` process serving both protocols.

    python -m tools.grpc_http_pairs --repository model_repository --model resnet20_cifar10 \\
        --batches 8,32 --concurrency 1,4 --rounds 4

For each batch size and concurrency, every round runs perf_analyzer once per protocol,
the order alternating round by round (HTTP first, then gRPC first, ...), so that a slow
drift of the machine falls on both. Each run records perf_analyzer's throughput and p50,
and the server's own CPU time per image (``/proc/PID/stat`` around the run, divided by
the images the server counted in ``/v2/models/{m}/stats``): that last figure is the
server's cost per image for each protocol, which the client's share of the cores and the
run-to-run spread of throughput do not blur. The table gives every round, the median of
the per-round gRPC/HTTP ratios, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tools.perf_analyzer import (
    CACHE,
    HOME_NAME,
    PerfAnalyzer,
    cpu_line,
    free_port,
    install,
    report_rows,
    wait_ready,
)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (its threads included), or of one thread."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def client_cpu_seconds() -> float:
    """CPU time of this script's finished children: the perf_analyzer runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def counts(url: str, model: str) -> tuple[int, int]:
    """Images and batches (executions) the server has run."""
    with urllib.request.urlopen(f"{url}/v2/models/{model}/stats", timeout=10) as r:
        (stats,) = json.loads(r.read())["model_stats"]
    return int(stats["inference_count"]), int(stats["execution_count"])


def snapshot(pid: int, url: str, model: str) -> tuple[float, float, float, int, int]:
    """Server CPU, its event loop thread's CPU, the clients' CPU, images, batches."""
    return cpu_seconds(pid), cpu_seconds(pid, pid), client_cpu_seconds(), *counts(url, model)


@dataclass(frozen=True)
class Run:
    batch: int
    clients: int
    round: int
    protocol: str
    rate: float  # images/s, perf_analyzer's
    p50_ms: float
    server_us: float  # server CPU per image, every thread
    loop_us: float  # of which the event loop's thread (the protocol's Python)
    client_us: float  # perf_analyzer's CPU per image
    mean_batch: float  # images per onnxruntime run


def median_ratio(runs: dict[str, list[Run]], attr: str) -> float:
    pairs = zip(runs["http"], runs["grpc"], strict=True)
    return statistics.median(getattr(g, attr) / getattr(h, attr) for h, g in pairs)


def cells(runs: list[Run], attr: str, fmt: str = ".0f") -> str:
    return ", ".join(format(getattr(r, attr), fmt) for r in runs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="8,32", help="images per request")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--window-ms", type=int, default=2000)
    p.add_argument("--server-arg", default="", help="more resnet-serve options")
    args = p.parse_args(argv)
    home = CACHE / HOME_NAME
    if not (home / "bin" / "perf_analyzer").is_file():
        install(home)
    tool = PerfAnalyzer.at(home)
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    server = [sys.executable, "-m", "resnet_serve.service.cli", "--repository",
              str(args.repository), "--models", args.model, "--port", str(port),
              "--grpc-port", str(grpc_port), *args.server_arg.split()]  # fmt: skip
    targets = {"http": port, "grpc": grpc_port}
    rows: list[Run] = []
    load_before = os.getloadavg()
    with subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            wait_ready(url, proc)
            with tempfile.TemporaryDirectory() as tmp:
                for batch in map(int, args.batches.split(",")):
                    for conc in map(int, args.concurrency.split(",")):
                        for rnd in range(1, args.rounds + 1):
                            order = ("http", "grpc") if rnd % 2 else ("grpc", "http")
                            for protocol in order:
                                out = Path(tmp) / "report.csv"
                                command = [
                                    "-m", args.model, "-u", f"127.0.0.1:{targets[protocol]}",
                                    "-i", protocol, "-b", str(batch),
                                    "--concurrency-range", f"{conc}:{conc}:1",
                                    "-p", str(args.window_ms), "-s", "10", "-r", "10",
                                    "-f", str(out),
                                ]  # fmt: skip
                                # perf_analyzer gives up when its last windows do not
                                # settle within -s (the machine is busy): tried again, twice.
                                for _ in range(3):
                                    before = snapshot(proc.pid, url, args.model)
                                    run = tool.run(command, timeout=600, cwd=tmp)
                                    after = snapshot(proc.pid, url, args.model)
                                    if run.returncode == 0:
                                        break
                                    print(run.stderr[-500:], file=sys.stderr, flush=True)
                                else:
                                    raise SystemExit(f"perf_analyzer failed:\n{run.stdout}")
                                (row,) = report_rows(out.read_text())
                                used, loop, client, images, batches = (
                                    a - b for a, b in zip(after, before, strict=True)
                                )
                                per = 1e6 / max(1, images)
                                rows.append(Run(batch, conc, rnd, protocol,
                                                float(row["Inferences/Second"]),
                                                int(row["p50 latency"]) / 1000, used * per,
                                                loop * per, client * per,
                                                images / max(1, batches)))  # fmt: skip
                                print(rows[-1], file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    load_after = os.getloadavg()
    print(f"- machine: {cpu_line()}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")  # fmt: skip
    print(f"- resnet-serve: `resnet-serve {' '.join(server[3:])}`; perf_analyzer "
          f"`-b B --concurrency-range C:C:1 -p {args.window_ms} -s 10 -r 10`\n")  # fmt: skip
    print(
        "| images per request | clients | HTTP img/s (rounds) | gRPC img/s (rounds) "
        "| gRPC/HTTP img/s | server CPU us/image HTTP; gRPC | gRPC/HTTP | event loop "
        "us/image HTTP; gRPC | client CPU us/image HTTP; gRPC | mean batch HTTP; gRPC |"
    )
    print("|---:|---:|---|---|---:|---|---:|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        for conc in map(int, args.concurrency.split(",")):
            by = {pr: sorted((r for r in rows if (r.batch, r.clients, r.protocol)
                              == (batch, conc, pr)), key=lambda r: r.round)
                  for pr in ("http", "grpc")}  # fmt: skip
            h, g = by["http"], by["grpc"]
            print(
                f"| {batch} | {conc} | {cells(h, 'rate')} | {cells(g, 'rate')} "
                f"| {median_ratio(by, 'rate'):.3f} "
                f"| {cells(h, 'server_us')}; {cells(g, 'server_us')} "
                f"| {median_ratio(by, 'server_us'):.3f} "
                f"| {cells(h, 'loop_us')}; {cells(g, 'loop_us')} "
                f"| {cells(h, 'client_us')}; {cells(g, 'client_us')} "
                f"| {cells(h, 'mean_batch', '.1f')}; {cells(g, 'mean_batch', '.1f')} |"
            )


if __name__ == "__main__":
    main()
