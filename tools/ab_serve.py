"""Two or more `resnet-serve` variants under the same load, in paired rounds: which is
faster on this machine, by how much, and how sure.

    python -m tools.ab_serve --repository /tmp/perf-repo --model resnet20_cifar10 \\
        --concurrency 32 --duration 8 --rounds 4 --server-arg="--tuning off --workers 2" \\
        --variant 'before|PYTHONPATH=/tmp/oldpkg' --variant 'after'

A variant is ``NAME|ENV=VALUE ...|extra resnet-serve options|MODEL`` (the last three parts
may be left out; MODEL defaults to ``--model``: two models can be set against each other,
int8 against fp32 for instance). With ``--engine-batch N`` each round starts by timing
onnxruntime alone on every variant's model (batches of N, the variant's session settings,
2 s), and the table adds each variant's service ratio to the first over its engine ratio
to the first: how much of the engine's difference the service keeps.

Every variant's server is started once, all of them up for the whole run (so that each
round measures the same processes); round after round, each is loaded in turn by
`resnet-bench --url` with the same clients, corpus and duration, the order rotating from
round to round, so that a slow drift of the machine falls on all of them. On a shared
machine one sweep's rate moves by 10-20% minutes apart; the ratio of two sweeps seconds
apart moves far less: the table gives every round and the median of the per-round ratios
to the first variant.

To compare two versions of the code: check the older one out (``git worktree add``) and
point a variant's ``PYTHONPATH`` at a folder holding ``resnet_serve/{service,contract,...}``
links into that checkout: the path's packages are found before the editable install's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tools.grpc_http_pairs import cpu_seconds
from tools.perf_analyzer import cpu_line, free_port, wait_ready


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    args: list[str]
    model: str | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    rates: list[float] = field(default_factory=list)
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, rest = text.partition("|")
        env_text, _, rest = rest.partition("|")
        args, _, model = rest.partition("|")
        env = dict(item.split("=", 1) for item in shlex.split(env_text))
        return cls(name.strip(), env, shlex.split(args), model.strip() or None)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its descendants alive now (``--workers``)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


@contextlib.contextmanager
def running(variants: list[Variant], options: list[str], logs: Path) -> Iterator[None]:
    """Every variant's ``resnet-serve`` (``options``, then its own) started, all ready;
    stopped on the way out. Logs in ``logs/NAME.log``."""
    try:
        for v in variants:
            v.port = free_port()
            models = ["--models", v.model] if v.model else []
            cmd = [
                sys.executable, "-m", "resnet_serve.service.cli", "--port", str(v.port),
                "--grpc-port", "0", "--log-level", "warning", *options, *models, *v.args,
            ]  # fmt: skip
            with open(logs / f"{v.name}.log", "wb") as log:
                v.proc = subprocess.Popen(
                    cmd, env={**os.environ, **v.env}, stdout=log, stderr=subprocess.STDOUT
                )
        for v in variants:
            assert v.proc is not None
            wait_ready(f"http://127.0.0.1:{v.port}", v.proc)
        yield
    finally:
        for v in variants:
            if v.proc is not None and v.proc.poll() is None:
                v.proc.terminate()
                v.proc.wait(60)


def rotation(variants: list[Variant], rounds: int) -> Iterator[tuple[int, Variant]]:
    """(round, variant) in the order measured: each round starts one variant later."""
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            yield r, v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", required=True)
    ap.add_argument("--model", help="every variant's model, unless it names its own")
    ap.add_argument("--variant", action="append", required=True, type=Variant.parse)
    ap.add_argument("--server-arg", default="", help="options every variant's server gets")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--images", help="resnet-bench --images: a folder of files or an .npz")
    ap.add_argument("--engine-batch", type=int, help="time onnxruntime alone too (batch size)")
    args = ap.parse_args(argv)
    variants: list[Variant] = args.variant
    if len({v.name for v in variants}) != len(variants) or len(variants) < 2:
        ap.error("give two or more variants, each with its own name")
    for v in variants:
        v.model = v.model or args.model
        if v.model is None:
            ap.error(f"variant {v.name}: no model (give --model, or MODEL in the variant)")
    print(f"# machine: {cpu_line()}; load average before: {os.getloadavg()[0]:.2f}")
    server_args = shlex.split(args.server_arg)
    engines = (
        [Engine(args.repository, v, server_args, args.engine_batch) for v in variants]
        if args.engine_batch
        else []
    )
    with (
        tempfile.TemporaryDirectory(prefix="ab-serve-") as tmp,
        running(variants, ["--repository", args.repository, *server_args], Path(tmp)),
    ):
        for r, v in rotation(variants, args.rounds):
            if v is variants[r % len(variants)]:  # a round's first sweep: the engines first
                for engine in engines:
                    engine.variant.engine.append(engine.rate(2.0))
            measure(v, args, Path(tmp) / f"{v.name}-{r}")
    report(variants, args)
    return 0


class Engine:
    """onnxruntime alone on a variant's model, with the session settings its server gets."""

    def __init__(self, repository: str, v: Variant, server_args: list[str], batch: int) -> None:
        from resnet_serve.bench import corpus, offline
        from resnet_serve.contract.preprocess import DecodeOptions, preprocess
        from resnet_serve.service.repository import load_model_spec
        from resnet_serve.service.sessions import SessionPool

        assert v.model is not None
        self.variant = v
        settings = offline.service_settings(Path(repository), v.model, [*server_args, *v.args])
        spec = load_model_spec(Path(repository) / v.model)
        options = DecodeOptions(
            max_pixels=settings.max_image_pixels, jpeg_draft=settings.jpeg_draft
        )
        images = [preprocess(d, i, spec.preprocess, options) for i, d in enumerate(corpus.load())]
        self.batch = np.stack([images[i % len(images)] for i in range(batch)])
        self.worker = SessionPool.load(spec, settings).workers[0]
        self.worker.run(self.batch)  # first-run allocations stay out

    def rate(self, seconds: float) -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.worker.run(self.batch)
            n += len(self.batch)
        return n / (time.perf_counter() - start)


def measure(v: Variant, args: argparse.Namespace, out: Path) -> None:
    assert v.proc is not None
    cmd = [
        sys.executable, "-m", "resnet_serve.bench.cli",
        "--url", f"http://127.0.0.1:{v.port}", "--repository", args.repository,
        "--model", str(v.model), "--concurrency", str(args.concurrency),
        "--duration", str(args.duration), "--warmup", str(args.warmup),
        "--images-per-request", str(args.images_per_request),
        "--no-offline", "--no-progress", "--out", str(out),
        *(["--images", args.images] if args.images else []),
    ]  # fmt: skip
    cpu, wall = tree_cpu_seconds(v.proc.pid), time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    v.cpus.append(100 * (tree_cpu_seconds(v.proc.pid) - cpu) / (time.perf_counter() - wall))
    (step,) = json.loads((out / "results.json").read_text())["steps"]
    if step["errors"]:
        raise SystemExit(f"{v.name}: errors {step['errors']}")
    v.rates.append(step["img_s"])
    v.p50s.append(step["p50_ms"])
    v.p99s.append(step["p99_ms"])


def report(variants: list[Variant], args: argparse.Namespace) -> None:
    first = variants[0]
    models = ", ".join(dict.fromkeys(str(v.model) for v in variants))
    print(
        f"\n{models}, {args.concurrency} clients, {args.images_per_request} image(s) per "
        f"request ({f'images from {args.images}' if args.images else 'photos'}), "
        f"{args.duration:g} s per sweep, {args.rounds} rounds; "
        f"load average after: {os.getloadavg()[0]:.2f}\n"
    )
    print("| variant | img/s by round | p50 ms by round | p99 ms by round | server CPU % "
          f"| ratio to {first.name} by round | median ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---:|")
    for v in variants:
        ratios = [a / b for a, b in zip(v.rates, first.rates, strict=True)]
        print(
            f"| {v.name} | {', '.join(f'{x:.1f}' for x in v.rates)} "
            f"| {', '.join(f'{x:.1f}' for x in v.p50s)} "
            f"| {', '.join(f'{x:.1f}' for x in v.p99s)} "
            f"| {', '.join(f'{x:.0f}' for x in v.cpus)} "
            f"| {', '.join(f'{x:.3f}' for x in ratios)} | {statistics.median(ratios):.3f} |"
        )
    if not first.engine:
        return
    print(f"\nonnxruntime alone, batches of {args.engine_batch}, at the start of each round:\n")
    print(f"| variant | engine img/s by round | engine ratio to {first.name} | service ratio "
          "over engine ratio, by round | median |")  # fmt: skip
    print("|---|---|---|---|---:|")
    for v in variants:
        engine = [a / b for a, b in zip(v.engine, first.engine, strict=True)]
        service = [a / b for a, b in zip(v.rates, first.rates, strict=True)]
        kept = [s / e for s, e in zip(service, engine, strict=True)]
        print(
            f"| {v.name} | {', '.join(f'{x:.1f}' for x in v.engine)} "
            f"| {', '.join(f'{x:.3f}' for x in engine)} "
            f"| {', '.join(f'{x:.3f}' for x in kept)} | {statistics.median(kept):.3f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
