"""``resnet-bench``: load-test resnet-serve over HTTP, measure the offline limits of the
same model file, optionally the naive baseline, and write a report, a plot and JSON.

The parts run one after the other, never at once, because they share the CPU: offline
limits first (before any server is up), then the service's sweep, then the baseline's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from resnet_serve.bench import corpus as corpus_mod
from resnet_serve.bench import load, offline, peers, rawhttp, report, tune
from resnet_serve.bench.servers import (
    ServerError,
    ServerProcess,
    start_naive,
    start_ort_baseline,
    start_peer,
    start_service,
)
from resnet_serve.service import tuning
from resnet_serve.service.repository import RepositoryError, load_model_spec
from resnet_serve.service.settings import Settings

if TYPE_CHECKING:
    from rich.progress import TaskID

EXIT_USAGE = 2
BODIES = ("multipart", "raw")
# resnet-serve takes any image/* type or this one for a raw body; one type for every image
# of the corpus lets the lean client prepare its header set once.
RAW_CONTENT_TYPE = ("Content-Type", "application/octet-stream")
DEFAULT_CONCURRENCY = "1,2,4,8,16,32,64"


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resnet-bench",
        description="Sweep concurrent HTTP clients against resnet-serve (started here with "
        "--start-server, or already running at --url), measure the offline limits of the same "
        "model file, optionally a naive FastAPI + PyTorch baseline (--baseline), and write "
        "results.md, results.png and results.json.",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--start-server", action="store_true", help="start resnet-serve on a free local port"
    )
    p.add_argument("--repository", type=Path, help="model repository (made by resnet-export)")
    p.add_argument(
        "--model", help="model name in the repository (with --url: default, the served default)"
    )
    p.add_argument(
        "--server-arg", action="append", default=[], metavar="ARGS",
        help="resnet-serve options, e.g. --server-arg='--max-batch-size 16' (repeatable); "
        "they also configure the offline measurements, so give them with --url too",
    )  # fmt: skip
    p.add_argument(
        "--concurrency", type=_positive_ints, default=_positive_ints(DEFAULT_CONCURRENCY),
        help=f"concurrent clients per step, comma-separated (default {DEFAULT_CONCURRENCY})",
    )  # fmt: skip
    length = p.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, help="seconds measured per step (default 10)")
    length.add_argument("--requests", type=int, help="requests measured per step")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per step")
    p.add_argument("--images-per-request", type=int, default=1, help="multipart file parts")
    p.add_argument(
        "--body", choices=BODIES, default="multipart",
        help="how a request carries its image: multipart (a form's file parts, as curl -F "
        "sends them; default) or raw (the image itself as the body, application/octet-stream, "
        "as curl --data-binary sends it: one image per request, and only peers that take it)",
    )  # fmt: skip
    p.add_argument("--endpoint", choices=("classify", "embed"), default="classify")
    p.add_argument("--encoding", choices=("float", "base64"), default="float", help="embed answers")
    p.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'",
        help="extra request header, e.g. 'Authorization: Bearer KEY' (repeatable)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    p.add_argument(
        "--client", choices=load.CLIENTS, default="raw",
        help="the load generator's HTTP client: raw (prepared requests, httptools' parser, "
        "uvloop; a quarter to a third of aiohttp's CPU per request, which on a small machine "
        "is CPU taken from the server measured) or aiohttp (TLS, proxies); default raw",
    )  # fmt: skip
    p.add_argument(
        "--baseline", action="store_true",
        help="also sweep the naive FastAPI + PyTorch server (bench/naive_server.py) on the "
        "same weights, one image per request",
    )  # fmt: skip
    p.add_argument(
        "--baseline-ort", action="store_true",
        help="also sweep FastAPI + onnxruntime (bench/baseline_ort.py) on the same model.onnx "
        "and preprocessing, a `def` endpoint without batching, one image per request",
    )  # fmt: skip
    p.add_argument(
        "--peer", action="append", default=[], metavar="NAME=PYTHON",
        help="also sweep a serving framework on the same model.onnx and preprocessing, "
        "its own batching on (bench/peers/NAME.py; NAME one of "
        f"{', '.join(peers.NAMES)}), started by PYTHON, the interpreter of an environment "
        "made by tools/peer_env.sh NAME DIR (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--peer-arg", action="append", default=[], metavar="ARGS",
        help="options for every peer, e.g. --peer-arg='--workers 2 --batch-delay-ms 2': "
        "model workers (each with cores / N onnxruntime threads; default 1) and the batch "
        "wait where the framework has one (default 0, greedy)",
    )  # fmt: skip
    p.add_argument(
        "--baseline-concurrency", type=_positive_ints,
        help="the baselines' and peers' steps (default: --concurrency); the PyTorch one "
        "serves one request at a time, so more clients only queue longer",
    )  # fmt: skip
    p.add_argument(
        "--baseline-weights",
        help="default | random | PATH for the baseline (default: what model.json records)",
    )
    p.add_argument(
        "--tune", action="store_true",
        help="first search the best settings for this model on this machine (service.tuning, "
        "full search), write OUT/tuning.json and the --tuning auto cache, and run the rest "
        "(offline limits, a started service) with them; alone, only the search",
    )  # fmt: skip
    p.add_argument("--tune-budget", type=float, default=180.0, help="seconds, about (180)")
    p.add_argument("--tune-rounds", type=int, default=2, help="rounds per configuration (2)")
    p.add_argument(
        "--rounds", type=int, default=1,
        help="sweep every system this many times, interleaved (all servers up at once); the "
        "ratios to the baselines are then medians of paired rounds (default 1)",
    )  # fmt: skip
    p.add_argument("--no-offline", action="store_true", help="skip the offline limits")
    p.add_argument(
        "--offline-seconds", type=float, default=2.0,
        help="seconds per offline measurement and round (default 2)",
    )  # fmt: skip
    p.add_argument(
        "--offline-rounds", type=int, default=3,
        help="interleaved rounds of the offline measurements; the best counts (default 3)",
    )  # fmt: skip
    p.add_argument(
        "--ratio-concurrency", type=int, default=16,
        help="the step compared with the offline pipeline and the baseline (default 16)",
    )  # fmt: skip
    p.add_argument("--corpus-size", type=int, default=64, help="JPEGs in the request corpus")
    p.add_argument(
        "--images", type=Path, metavar="PATH",
        help="send these images instead of the photo corpus: a folder of image files (sent as "
        "they are, in name order) or an .npz whose `images` array is uint8 [N, H, W, 3] "
        "(each sent as a PNG), e.g. ../shared/data/cifar10-test-846.npz",
    )  # fmt: skip
    p.add_argument("--corpus-dir", type=Path, help="corpus cache (default ~/.cache/resnet-bench)")
    p.add_argument("--out", type=Path, help="output directory (default bench-results/<time>)")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    return p


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _served_default(url: str) -> str:
    models = _get_json(url.rstrip("/") + "/v1/models")["models"]
    return next(m["name"] for m in models if m.get("default")) if models else ""


class Display:
    """A live progress bar per step (rich) on a terminal; one summary line per step always."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not (enabled and self.console.is_terminal),
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def log(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def step(self, label: str, total: float, by_time: bool) -> load.Tick:
        """The bar of one step: measured seconds of ``total`` (``by_time``), or measured
        requests of ``total``."""
        task = self._task = self.progress.add_task(label, total=total, status="")

        def tick(measured: float | None, ok: int, errors: int) -> None:
            if measured is None:
                self.progress.update(task, completed=0, status="warming up")
                return
            status = f"{ok} ok, {errors} errors, {ok / max(measured, 1e-9):.1f} req/s"
            done = measured if by_time else ok + errors
            self.progress.update(task, completed=min(done, total), status=status)

        return tick

    def finish_step(self, s: load.StepResult) -> None:
        if self._task is not None:
            self.progress.remove_task(self._task)  # its summary line replaces it
            self._task = None
        self.log(
            f"{s.system} @ {s.concurrency}: {s.img_s:.1f} img/s, p50 {s.percentile(50):.1f} ms, "
            f"p99 {s.percentile(99):.1f} ms, errors {s.error_count}"
        )


def sweep(
    display: Display,
    target: load.Target,
    bodies: list[bytes],
    args: argparse.Namespace,
    server_pid: int | None,
    concurrency: list[int],
) -> list[load.StepResult]:
    results = []
    duration = args.duration if args.requests is None else None
    for c in concurrency:
        by_time = duration is not None
        total = duration if duration is not None else float(args.requests)
        tick = display.step(f"{target.system} @ {c} clients", total, by_time)
        result = rawhttp.run(
            load.run_step(
                target, bodies, c,
                warmup_s=args.warmup, duration_s=duration, requests=args.requests,
                timeout_s=args.timeout, server_pid=server_pid, tick=tick, client=args.client,
            )
        )  # fmt: skip
        display.finish_step(result)
        results.append(result)
    return results


def _model_info(model_dir: Path | None) -> dict[str, Any]:
    if model_dir is None:
        return {}
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    return {
        "arch": meta.get("arch"),
        "precision": meta.get("precision", "fp32"),
        "input_px": meta["preprocess"]["crop"],
        "weights": (meta.get("weights") or {}).get("source"),
    }


def _versions() -> dict[str, str]:
    # Read from the installed metadata: importing torch here would cost the client
    # process memory and start-up time for nothing.
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "onnxruntime-gpu", "torch", "numpy", "pillow", "aiohttp"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _baseline_info(args: argparse.Namespace) -> str | None:
    parts = []
    if args.baseline_ort:
        parts.append(
            "FastAPI + onnxruntime (bench/baseline_ort.py) under uvicorn: `def` endpoint, one "
            "session with onnxruntime's default options, the service's preprocessing, no "
            "batching, one image per request"
        )
    peer_options = " ".join(args.peer_arg) or "defaults: --workers 1 --batch-delay-ms 0"
    for name, python in _peer_args(args):
        parts.append(f"{peers.peer(name).description} ({python}; {peer_options})")
    if args.baseline:
        threads = os.environ.get("OMP_NUM_THREADS")
        parts.append(
            "naive FastAPI + PyTorch eager (bench/naive_server.py) under uvicorn, one image per "
            "request, torch intra-op threads "
            + (f"{threads} (OMP_NUM_THREADS)" if threads else "default (one per core)")
        )
    return "; ".join(parts) or None


def _peer_args(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--peer NAME=PYTHON`` as pairs (checked by ``main``)."""
    return [tuple(p.split("=", 1)) for p in args.peer]  # type: ignore[misc]


def _tunes_in_background(model_dir: Path | None, settings: Settings | None) -> bool:
    """Whether a started service will run its tuning search during the measurements."""
    if model_dir is None or settings is None or settings.tuning != "auto":
        return False
    return tuning.find(load_model_spec(model_dir), settings)[1]


# A system under test: its label, how to start it (None: already running), its sweep.
System = tuple[
    str,
    "Callable[[], ServerProcess] | None",
    "Callable[[ServerProcess | None], list[load.StepResult]]",
]


def run_systems(
    systems: list[System], rounds: int, log: Callable[[str], None],
    before_round: Callable[[int], None] | None = None,
    idle_cpu: dict[str, float] | None = None, idle_s: float = 4.0,
) -> list[load.StepResult]:  # fmt: skip
    """Each system's sweep. One round: one system after the other, each server up only for
    its own sweep. Several: every server up at once, the sweeps interleaved round after
    round, so that a busy spell on the machine falls on all of them rather than on one (the
    report pairs the rounds); ``before_round(r)`` runs at the start of each (the offline
    pipeline's measurement of that round). An idle server should take no CPU, but a
    framework's own processes may (schedulers, health loops, a JVM): with ``idle_cpu``, each
    server's CPU over ``idle_s`` seconds with all of them up and none loaded is put there
    (cores, by label) before the first round, so that the report can say what the others'
    sweeps shared the machine with."""
    if rounds == 1:
        steps: list[load.StepResult] = []
        for label, start, sweep_fn in systems:
            log(f"starting {label}" if start else f"measuring {label}")
            steps += _with_server(start, sweep_fn) if start else sweep_fn(None)
        return steps
    with contextlib.ExitStack() as stack:
        servers = []
        for label, start, _ in systems:
            server = None
            if start is not None:
                log(f"starting {label}")
                server = start()
                stack.callback(server.stop)
            servers.append(server)
        if idle_cpu is not None:
            idle_cpu.update(_idle_cpu([label for label, _, _ in systems], servers, idle_s))
        steps = []
        for r in range(1, rounds + 1):
            if before_round is not None:
                before_round(r)
            for (label, _, sweep_fn), server in zip(systems, servers, strict=True):
                log(f"round {r}/{rounds}: {label}")
                for step in sweep_fn(server):
                    step.round = r
                    steps.append(step)
        return steps


def _idle_cpu(
    labels: list[str], servers: list[ServerProcess | None], seconds: float
) -> dict[str, float]:
    time.sleep(1.0)  # start-up work (a first compile, a JIT) is not idling
    pids = {lb: srv.pid for lb, srv in zip(labels, servers, strict=True) if srv is not None}
    before = {lb: load.process_cpu_s(pid) for lb, pid in pids.items()}
    start = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - start
    after = {lb: load.process_cpu_s(pid) for lb, pid in pids.items()}
    return {
        lb: (after[lb] - before[lb]) / wall  # type: ignore[operator]
        for lb in pids
        if before[lb] is not None and after[lb] is not None
    }


def _with_server(
    start: Callable[[], ServerProcess], run: Callable[[ServerProcess], list[load.StepResult]]
) -> list[load.StepResult]:
    server = start()
    try:
        return run(server)
    finally:
        server.stop()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the sweep's finally blocks, which stop the servers this
    # process started; the default action would leave them running.
    raise SystemExit(128 + signum)


def _meta(
    args: argparse.Namespace,
    model: str,
    model_dir: Path | None,
    settings: Settings | None,
    spec: corpus_mod.CorpusSpec,
    images: list[bytes],
    server_args: list[str],
    path: str,
) -> dict[str, Any]:
    """What the report says about the run besides the measurements."""
    return {
        "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": report.machine_info(),
        "loadavg_before": list(os.getloadavg()),
        "model": model,
        "model_dir": str(model_dir) if model_dir is not None else None,
        "model_info": _model_info(model_dir),
        "versions": _versions(),
        "baseline": _baseline_info(args),
        "endpoint_path": path,
        "images_per_request": args.images_per_request,
        "body": args.body,
        "concurrency": args.concurrency,
        "step": f"{args.duration:g} s measured per step"
        if args.duration is not None
        else f"{args.requests} requests measured per step",
        "warmup_s": args.warmup,
        "timeout_s": args.timeout,
        "client": args.client,
        "corpus": {
            "count": len(images),
            "source": str(args.images) if args.images is not None else "photos",
            "seed": spec.seed,
            "quality": spec.quality,
            "key": spec.key if args.images is None else None,
            "formats": corpus_mod.formats(images),
            "mean_bytes": sum(map(len, images)) / len(images),
        },
        "server_args": server_args,
        "service": (
            f"`{' '.join(['resnet-serve', *server_args])}`"
            + (" started by resnet-bench" if args.start_server else f" at {args.url}")
            + (
                f"; max batch {settings.max_batch_size}, max batch delay "
                f"{settings.max_batch_delay_ms:g} ms, {settings.sessions_per_device} session(s), "
                f"{settings.decode_threads} decode threads"
                if settings is not None
                else ""
            )
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return run(args)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    usage_errors = []
    if args.url is None and not args.start_server and not args.tune:
        usage_errors.append("one of --url, --start-server or --tune is needed")
    if args.tune and (args.repository is None or args.model is None):
        usage_errors.append("--tune needs --repository and --model")
    if args.start_server and (args.repository is None or args.model is None):
        usage_errors.append("--start-server needs --repository and --model")
    if args.baseline and args.repository is None:
        usage_errors.append("--baseline needs --repository (and the model) to build the model")
    if args.baseline_ort and args.repository is None:
        usage_errors.append("--baseline-ort needs --repository (and the model)")
    for p in args.peer:
        name, sep, python = p.partition("=")
        if not sep or name not in peers.NAMES or not python:
            usage_errors.append(f"--peer {p!r}: expected NAME=PYTHON, NAME one of "
                                f"{', '.join(peers.NAMES)}")  # fmt: skip
        elif not os.access(python, os.X_OK):
            usage_errors.append(
                f"--peer {p!r}: {python} is not an executable; make the peer's environment "
                f"with tools/peer_env.sh {name} DIR and give DIR/bin/python"
            )
    if args.peer and args.repository is None:
        usage_errors.append("--peer needs --repository (and the model)")
    if (args.baseline or args.baseline_ort or args.peer) and args.endpoint != "classify":
        usage_errors.append(
            "the baselines and peers compare classification only (--endpoint classify)"
        )
    if args.body == "raw":
        if args.images_per_request != 1:
            usage_errors.append("--body raw carries one image per request (--images-per-request 1)")
        if args.baseline or args.baseline_ort:
            usage_errors.append("--body raw: the FastAPI baselines take multipart forms only")
        for name in {p.partition("=")[0] for p in args.peer}:
            if name in peers.NAMES and not peers.peer(name).raw_body:
                usage_errors.append(f"--body raw: the {name} peer takes multipart forms only")
    if min(args.images_per_request, args.corpus_size, args.offline_rounds, args.rounds) < 1:
        usage_errors.append(
            "--images-per-request, --corpus-size, --offline-rounds and --rounds must be positive"
        )
    if (args.duration is not None and args.duration <= 0) or (
        args.requests is not None and args.requests < 1
    ):
        usage_errors.append("--duration and --requests must be positive")
    if usage_errors:
        for e in usage_errors:
            print(f"resnet-bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    server_args = [a for chunk in args.server_arg for a in shlex.split(chunk)]
    peer_args = [a for chunk in args.peer_arg for a in shlex.split(chunk)]
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            print(f"resnet-bench: --header {h!r} is not 'NAME: VALUE'", file=sys.stderr)
            return EXIT_USAGE
        headers.append((name.strip(), value.strip()))

    try:
        model = args.model or _served_default(str(args.url))
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        print(
            f"resnet-bench: cannot read the served models from {args.url}: {exc}", file=sys.stderr
        )
        return 1
    if not model:
        print(f"resnet-bench: {args.url} serves no models", file=sys.stderr)
        return 1
    model_dir = args.repository / model if args.repository is not None else None
    if model_dir is not None and not (model_dir / "model.json").is_file():
        print(f"resnet-bench: {model_dir / 'model.json'} does not exist", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = (
            offline.service_settings(args.repository, model, server_args)
            if args.repository is not None
            else None
        )
    except ValidationError as exc:
        print(f"resnet-bench: invalid --server-arg: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RepositoryError as exc:  # a --tuning file that does not fit
        print(f"resnet-bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    spec = corpus_mod.CorpusSpec(count=args.corpus_size)
    try:
        images = (
            corpus_mod.load(spec, args.corpus_dir)
            if args.images is None
            else corpus_mod.from_path(args.images)
        )
    except (OSError, ValueError, KeyError) as exc:
        print(f"resnet-bench: --images {args.images}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    path = f"/v1/models/{model}/{args.endpoint}"
    if args.endpoint == "embed":
        path += f"?encoding={args.encoding}"
    tuning_md = ""
    if args.tune:
        assert model_dir is not None and settings is not None
        # The search's own bounds (the largest batch) are the options as given, never a
        # choice cached by an earlier search: that would only ever search below it again.
        untuned = offline.service_settings(
            args.repository, model, [*server_args, "--tuning", "off"]
        )
        with Display(not args.no_progress) as display:
            tuned = tune.run(
                model_dir, images, untuned, out, args.tune_budget, args.tune_rounds, display.log
            )
        tuning_md = tune.markdown(tuned)
        if args.url is None and not args.start_server:
            (out / "results.md").write_text(tuning_md, encoding="utf-8")
            print(tuning_md)
            return 0
        server_args += ["--tuning", str(tuned)]
        settings = offline.service_settings(args.repository, model, server_args)
    meta = _meta(args, model, model_dir, settings, spec, images, server_args, path)

    steps: list[load.StepResult] = []
    offline_result: offline.OfflineResult | None = None
    pipeline_rounds: list[float] = []
    before_round: Callable[[int], None] | None = None
    idle_cpu: dict[str, float] = {}
    with Display(not args.no_progress) as display, contextlib.ExitStack() as stack:
        try:
            if not args.no_offline and model_dir is not None and settings is not None:
                offline_result = offline.measure(
                    model_dir, images, settings, args.offline_seconds, args.offline_rounds,
                    display.log,
                )  # fmt: skip
            elif not args.no_offline:
                display.log("offline limits skipped: give --repository to measure them")
            # The baseline first: a model it cannot rebuild (weights not found) fails in
            # seconds rather than after the whole service sweep.
            baselines: list[tuple[str, Callable[[], ServerProcess]]] = []
            if args.baseline_ort:
                assert model_dir is not None
                baselines.append(("ort", lambda: start_ort_baseline(model_dir, out / "ort.log")))
            if args.baseline:
                assert model_dir is not None
                baselines.append(
                    ("naive", lambda: start_naive(model_dir, args.baseline_weights,
                                                  out / "naive.log"))
                )  # fmt: skip
            one_image = load.request_bodies(images, 1)
            # Each system's path, answer kind, request headers and bodies.
            requests: dict[str, tuple[str, str, tuple[tuple[str, str], ...], list[bytes]]] = {
                "ort": ("/classify", "classify", (), one_image),
                "naive": ("/classify", "classify", (), one_image),
            }
            for name, python in _peer_args(args):
                assert model_dir is not None

                def start_named(name: str = name, python: str = python) -> ServerProcess:
                    return start_peer(name, python, model_dir, out / name, peer_args)

                baselines.append((name, start_named))
                contract = peers.peer(name)
                url_path = contract.classify_path.format(model=model)
                if contract.request == "v2":
                    v2_bodies, v2_headers = load.v2_bytes_bodies(images, *contract.v2_tensors)
                    requests[name] = (url_path, "v2", tuple(v2_headers), v2_bodies)
                elif args.body == "raw":
                    requests[name] = (url_path, "classify", (RAW_CONTENT_TYPE,), list(images))
                else:
                    requests[name] = (url_path, "classify", (), one_image)
            systems: list[System] = []
            for system, start in baselines:

                def run_baseline(
                    server: ServerProcess | None, system: str = system
                ) -> list[load.StepResult]:
                    assert server is not None
                    url_path, kind, sent_headers, sent = requests[system]
                    target = load.Target(system, server.url + url_path, 1, kind, sent_headers)
                    levels = args.baseline_concurrency or args.concurrency
                    return sweep(display, target, sent, args, server.pid, levels)

                systems.append((report.label(system), start, run_baseline))

            if args.body == "raw":
                bodies = list(images)
                headers.append(RAW_CONTENT_TYPE)
            else:
                bodies = load.request_bodies(images, args.images_per_request)

            def run_service(server: ServerProcess | None) -> list[load.StepResult]:
                base = server.url if server is not None else args.url.rstrip("/")
                target = load.Target(
                    "service", base + path, args.images_per_request, args.endpoint,
                    tuple(headers), metrics_url=base + "/metrics", model=model,
                )  # fmt: skip
                pid = server.pid if server else None
                return sweep(display, target, bodies, args, pid, args.concurrency)

            start_svc = None
            if args.start_server:
                if _tunes_in_background(model_dir, settings):
                    display.log(
                        "warning: --tuning auto has nothing cached for this model here, so the "
                        "service measures in the background (at nice 19) during the run; "
                        "run --tune first, or --server-arg='--tuning off'"
                    )

                def start_svc() -> ServerProcess:
                    return start_service(args.repository, model, server_args, out / "service.log")

            systems.append(("resnet-serve", start_svc, run_service))
            if args.rounds > 1 and offline_result is not None:
                assert model_dir is not None and settings is not None
                probe = offline.PipelineProbe(model_dir, images, settings)
                stack.callback(probe.close)

                def measure_pipeline(r: int, probe: offline.PipelineProbe = probe) -> None:
                    display.log(f"round {r}/{args.rounds}: offline pipeline")
                    pipeline_rounds.append(probe.rate(args.offline_seconds))

                before_round = measure_pipeline
            steps += run_systems(systems, args.rounds, display.log, before_round, idle_cpu)
        except ServerError as exc:
            print(f"resnet-bench: {exc}", file=sys.stderr)
            return 1

    meta["loadavg_after"] = list(os.getloadavg())
    meta["idle_cpu"] = idle_cpu
    meta["finished_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
    order = ["service", *report.BASELINES]
    steps.sort(key=lambda st: (order.index(st.system), st.concurrency, st.round))
    ratio_rows = report.ratios(steps, offline_result, args.ratio_concurrency, pipeline_rounds)
    text = report.markdown(meta, steps, offline_result, ratio_rows) + (
        "\n" + tuning_md if tuning_md else ""
    )
    (out / "results.md").write_text(text, encoding="utf-8")
    report.dump_json(out / "results.json", meta, steps, offline_result, ratio_rows)
    info = meta["model_info"]
    title = f"{model} ({info.get('precision', '?')}), {meta['started_at']}"
    report.plot(out / "results.png", title, steps, offline_result)
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.png'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
