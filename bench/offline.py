"""The offline limits: what the same model file and the same code can do without HTTP.

Everything here goes through the service's own pieces: ``load_model_spec`` for the
model directory, ``preprocess`` with the service's ``DecodeOptions``, and sessions made
by ``SessionPool.load`` from the ``Settings`` that ``resnet-serve`` would parse from the
same arguments. So the limits are those of this service's configuration, not of some
better-tuned one, and the gap between them and the HTTP figures is the serving overhead.

- ``ort_batch1`` / ``ort_max_batch``: onnxruntime alone on already-preprocessed batches;
- ``decode_single`` / ``decode_pool``: decode + resize + crop alone, one thread and the
  service's decode thread count;
- ``pipeline``: both at once, a decode pool feeding full batches to the session(s), the
  service's best case (always-full batches, no HTTP, no parsing);
- ``single_image``: decode + preprocess + inference of batch 1, one image at a time: the
  floor under the service's one-client latency.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resnet_serve.contract.preprocess import DecodeOptions, preprocess
from resnet_serve.service import tuning
from resnet_serve.service.cli import settings_from_args
from resnet_serve.service.repository import ModelSpec, load_model_spec
from resnet_serve.service.sessions import SessionPool, Worker
from resnet_serve.service.settings import Settings


@dataclass
class Rate:
    """A throughput, and the per-operation latencies it was measured from."""

    name: str
    images_per_s: float
    batch: int
    threads: int
    op_ms: list[float] = field(default_factory=list, repr=False)
    rounds: list[float] = field(default_factory=list)  # images/s of every round
    # CPU time this process got during the best round, in percent of one core: below
    # what its threads could use, something else had the CPU.
    cpu_percent: float = float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.op_ms, q)) if self.op_ms else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "img_s": self.images_per_s,
            "batch": self.batch,
            "threads": self.threads,
            "op_p50_ms": self.percentile(50),
            "rounds_img_s": self.rounds,
            "cpu_percent": self.cpu_percent,
            "op_ms": [round(x, 3) for x in self.op_ms],
        }


@dataclass
class OfflineResult:
    model: str
    max_batch: int
    sessions: int
    intra_op_threads: int
    decode_threads: int
    rounds: int
    seconds: float
    ort_batch1: Rate
    ort_max_batch: Rate
    decode_single: Rate
    decode_pool: Rate
    pipeline: Rate
    single_image: Rate

    def rates(self) -> list[Rate]:
        return [
            self.ort_batch1, self.ort_max_batch, self.decode_single,
            self.decode_pool, self.pipeline, self.single_image,
        ]  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_batch": self.max_batch,
            "sessions": self.sessions,
            "intra_op_threads": self.intra_op_threads,
            "decode_threads": self.decode_threads,
            "rounds": self.rounds,
            "seconds_per_round": self.seconds,
            **{r.name: r.to_json() for r in self.rates()},
        }


def service_settings(repository: Path, model: str, server_args: Sequence[str]) -> Settings:
    """The ``Settings`` that ``resnet-serve`` serves ``model`` with, from these arguments (and
    the ``RESNET_SERVE_*`` environment) and the tuning they name (``--tuning``, or what
    ``auto`` has cached), so offline and HTTP runs share one configuration."""
    settings = settings_from_args(
        ["--repository", str(repository), "--models", model, *server_args]
    )
    model_dir = repository / model
    if not (model_dir / "model.json").is_file():
        return settings  # said by the caller, with its own message
    return tuning.apply(tuning.find(load_model_spec(model_dir), settings)[0], settings)


def _loop(fn: Callable[[int], int], seconds: float, min_ops: int) -> tuple[float, list[float]]:
    """Run ``fn(i)`` (returning how many images it handled) back to back for ``seconds``
    and at least ``min_ops`` times: (images per second, per-call milliseconds)."""
    ms: list[float] = []
    images = 0
    start = time.perf_counter()
    end = start
    i = 0
    while end - start < seconds or i < min_ops:
        t = time.perf_counter()
        images += fn(i)
        end = time.perf_counter()
        ms.append((end - t) * 1000.0)
        i += 1
    return images / (end - start), ms


def _parallel(
    fns: Sequence[Callable[[int], int]], seconds: float, min_ops: int
) -> tuple[float, list[float]]:
    """``_loop`` on one thread per function at once; the rates add up."""
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        results = list(pool.map(lambda fn: _loop(fn, seconds, min_ops), fns))
    return sum(r for r, _ in results), [m for _, ms in results for m in ms]


# seconds -> (images per second, per-call milliseconds)
Measurement = Callable[[float], tuple[float, list[float]]]


def _batch(arrays: Sequence[np.ndarray], size: int) -> np.ndarray:
    return np.stack([arrays[i % len(arrays)] for i in range(size)])


def _ort(workers: Sequence[Worker], batch: np.ndarray) -> Measurement:
    n = len(batch)

    def runner(w: Worker) -> Callable[[int], int]:
        return lambda _: (w.run(batch), n)[1]

    return lambda seconds: _parallel([runner(w) for w in workers], seconds, min_ops=3)


def _pipeline(
    corpus: Sequence[bytes],
    spec: ModelSpec,
    options: DecodeOptions,
    workers: Sequence[Worker],
    batch_size: int,
    decode_threads: int,
    seconds: float,
) -> tuple[float, list[float]]:
    """Decode threads fill a queue of images; one inference thread per session takes
    full batches from it. The rate is counted at the sessions, after their first batch."""
    images: queue.Queue[np.ndarray] = queue.Queue(maxsize=batch_size * (len(workers) + 1))
    stop = threading.Event()
    counter = iter(range(1 << 62))
    lock = threading.Lock()
    failed: list[BaseException] = []

    def decoder() -> None:
        try:
            while not stop.is_set():
                with lock:
                    i = next(counter)
                arr = preprocess(corpus[i % len(corpus)], i, spec.preprocess, options)
                while not stop.is_set():
                    try:
                        images.put(arr, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced by the inference threads, never a hang
            failed.append(exc)
            stop.set()

    def take() -> np.ndarray:
        while True:
            if failed:
                raise RuntimeError("a decode thread failed") from failed[0]
            try:
                return images.get(timeout=0.1)
            except queue.Empty:
                continue

    def infer(worker: Worker) -> tuple[float, list[float]]:
        buf = np.empty((batch_size, *spec.input_shape), dtype=np.uint8)
        done: list[float] = []
        ms: list[float] = []
        deadline = None
        while True:
            for k in range(batch_size):
                buf[k] = take()
            t = time.perf_counter()
            worker.run(buf, busy=True)  # decoding goes on meanwhile, as under load
            now = time.perf_counter()
            ms.append((now - t) * 1000.0)
            done.append(now)
            if deadline is None:
                # The first batch waited for the decoders to start: the clock starts after it.
                deadline = now + seconds
            elif now >= deadline and len(done) >= 3:
                return (len(done) - 1) * batch_size / (done[-1] - done[0]), ms

    decoders = [threading.Thread(target=decoder, daemon=True) for _ in range(decode_threads)]
    for t in decoders:
        t.start()
    try:
        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            results = list(pool.map(infer, workers))
    finally:
        stop.set()
        for t in decoders:
            t.join()
    return sum(r for r, _ in results), [m for _, ms in results for m in ms]


class PipelineProbe:
    """The offline pipeline of ``measure`` kept loaded, to be measured once per round of
    ``--rounds`` right before the sweeps: the service's rate over the pipeline's is then a
    ratio of two measurements seconds apart, like the baselines' paired rounds (on a
    shared machine one configuration's offline rate moves by 10% within minutes)."""

    def __init__(self, model_dir: Path, corpus: Sequence[bytes], settings: Settings) -> None:
        self.spec = load_model_spec(model_dir)
        self.corpus = corpus
        self.settings = settings
        self.options = DecodeOptions(
            max_pixels=settings.max_image_pixels, jpeg_draft=settings.jpeg_draft
        )
        self.pool = SessionPool.load(self.spec, settings)
        batch = _batch(
            [preprocess(d, i, self.spec.preprocess, self.options) for i, d in enumerate(corpus)],
            settings.max_batch_size,
        )
        for w in self.pool.workers:  # first-run allocations stay out of the figures
            w.run(batch, busy=True)

    def rate(self, seconds: float) -> float:
        s = self.settings
        rate, _ = _pipeline(
            self.corpus, self.spec, self.options, self.pool.workers, s.max_batch_size,
            s.decode_threads, seconds,
        )  # fmt: skip
        return rate

    def close(self) -> None:
        self.pool.close()


def measure(
    model_dir: Path,
    corpus: Sequence[bytes],
    settings: Settings,
    seconds: float = 2.0,
    rounds: int = 3,
    log: Callable[[str], None] = lambda _: None,
) -> OfflineResult:
    """Every measurement ``rounds`` times for ``seconds``, interleaved, keeping each one's
    best round: other work on the machine only ever slows a run down, so the fastest round
    is the closest to the limit, and interleaving spreads a busy spell over all of them."""
    spec = load_model_spec(model_dir)
    options = DecodeOptions(max_pixels=settings.max_image_pixels, jpeg_draft=settings.jpeg_draft)
    # One served model, as resnet-serve --models NAME: its sessions share the cores.
    pool = SessionPool.load(spec, settings)
    workers = pool.workers
    worker = workers[0]
    threads = worker.session.get_session_options().intra_op_num_threads
    decode_threads = settings.decode_threads
    max_batch = settings.max_batch_size
    arrays = [preprocess(d, i, spec.preprocess, options) for i, d in enumerate(corpus)]
    batch1, batchn = _batch(arrays, 1), _batch(arrays, max_batch)
    for w in workers:  # first-run allocations and kernel choice stay out of the figures
        for busy in (False, True):
            w.run(batch1, busy=busy)
            w.run(batchn, busy=busy)

    def decode_from(offset: int) -> Callable[[int], int]:
        def fn(i: int) -> int:
            k = (offset + i) % len(corpus)
            preprocess(corpus[k], k, spec.preprocess, options)
            return 1

        return fn

    def single(i: int) -> int:
        k = i % len(corpus)
        worker.run(preprocess(corpus[k], k, spec.preprocess, options)[None])
        return 1

    step = max(1, len(corpus) // decode_threads)
    decoders = [decode_from(t * step) for t in range(decode_threads)]
    plan: list[tuple[str, int, int, Measurement]] = [
        ("ort_batch1", 1, threads, _ort(workers, batch1)),
        ("ort_max_batch", max_batch, threads, _ort(workers, batchn)),
        ("decode_single", 1, 1, lambda t: _loop(decode_from(0), t, min_ops=len(corpus))),
        ("decode_pool", 1, decode_threads, lambda t: _parallel(decoders, t, len(corpus))),
        ("pipeline", max_batch, decode_threads,
         lambda t: _pipeline(corpus, spec, options, workers, max_batch, decode_threads, t)),
        ("single_image", 1, threads, lambda t: _loop(single, t, min_ops=min(len(corpus), 16))),
    ]  # fmt: skip
    runs: dict[str, list[tuple[float, list[float], float]]] = {name: [] for name, *_ in plan}
    for r in range(rounds):
        log(
            f"offline: round {r + 1}/{rounds}: onnxruntime batch 1 and {max_batch} "
            f"({len(workers)} session(s) x {threads} threads), decode + preprocess, "
            f"pipeline, single image"
        )
        for name, _, _, fn in plan:
            cpu, wall = time.process_time(), time.perf_counter()
            rate, ms = fn(seconds)
            cpu_percent = 100.0 * (time.process_time() - cpu) / (time.perf_counter() - wall)
            runs[name].append((rate, ms, cpu_percent))
    pool.close()
    rates = {}
    for name, batch, n_threads, _ in plan:
        rate, ms, cpu_percent = max(runs[name], key=lambda run: run[0])
        all_rates = [run[0] for run in runs[name]]
        rates[name] = Rate(name, rate, batch, n_threads, ms, all_rates, cpu_percent)
    return OfflineResult(
        model=spec.name,
        max_batch=max_batch,
        sessions=len(workers),
        intra_op_threads=threads,
        decode_threads=decode_threads,
        rounds=rounds,
        seconds=seconds,
        **rates,
    )
