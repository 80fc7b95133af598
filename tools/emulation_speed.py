"""Why an emulated AVX2-only CPU cannot stand in for a real one in a benchmark.

    python -m tools.emulation_speed --model /tmp/perf-repo/resnet20_cifar10/model.onnx \\
        [--cpu EPYC-Milan] [--batch 8] [--seconds 3]

Times one onnxruntime batch (one intra-op thread, the model's uint8 NHWC input) and a loop
of plain Python (a dict filled and summed), natively and under QEMU's user-mode emulator
with an AVX2-only CPU (``-cpu EPYC-Milan``, the Zen 3 that tests/models/test_int8_isa.py
emulates to check int8 correctness), and prints each one's slowdown. onnxruntime picks its
kernels from CPUID, so under the emulator it runs its AVX2 ones, but the two kinds of work
slow down by very different factors: a ratio between a server (Python around the model)
and the offline pipeline (mostly the model) measured under emulation is not the ratio on
a real AVX2 CPU. docs/benchmarks.md (tenth session) has the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = "--child"


def measure(model: Path, batch: int, seconds: float) -> dict[str, object]:
    """This process's timings, and the CPU features numpy found at run time (CPUID)."""
    import numpy as np
    import onnxruntime as ort
    from numpy._core._multiarray_umath import __cpu_features__ as features

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    shape = [batch, *(int(d) for d in inp.shape[1:])]
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    feed = {inp.name: images}
    session.run(None, feed)  # first run: allocations, not timed

    def rate(work: object) -> float:
        runs, start = 0, time.perf_counter()
        while True:
            work()  # type: ignore[operator]
            runs += 1
            spent = time.perf_counter() - start
            if spent >= seconds:
                return 1e3 * spent / runs

    def python_loop() -> int:
        d = {}
        for i in range(1000):
            d[str(i)] = i * 2
        return sum(d.values())

    return {
        "engine_ms": rate(lambda: session.run(None, feed)),
        "python_ms": rate(python_loop),
        "avx2": bool(features.get("AVX2")),
        "avx512f": bool(features.get("AVX512F")),
    }


def run(argv: list[str]) -> dict[str, object]:
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [CHILD]:
        print(json.dumps(measure(Path(args[1]), int(args[2]), float(args[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a model.onnx of the repository")
    ap.add_argument("--cpu", default="EPYC-Milan", help="QEMU's CPU model (AVX2-only Zen 3)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    a = ap.parse_args(args)
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        ap.error("qemu-x86_64 not found (Debian: apt-get install qemu-user)")
    child = ["-m", "tools.emulation_speed", CHILD, str(a.model), str(a.batch), str(a.seconds)]
    native = run([sys.executable, *child])
    emulated = run([qemu, "-cpu", a.cpu, sys.executable, *child])
    print(f"{a.model}, batch {a.batch}, one intra-op thread; emulated CPU {a.cpu}")
    print("| | native | emulated | slowdown |")
    print("|---|---:|---:|---:|")
    for key, name in (("engine_ms", "onnxruntime batch, ms"), ("python_ms", "Python loop, ms")):
        n, e = float(native[key]), float(emulated[key])  # type: ignore[arg-type]
        print(f"| {name} | {n:.3f} | {e:.3f} | {e / n:.1f}x |")
    for key in ("avx2", "avx512f"):
        print(f"| {key} (CPUID, numpy) | {native[key]} | {emulated[key]} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
