"""The search of service/tuning.py: measure the configurations that matter for one model on
this machine, within a time budget, and pick one (see tuning.py for what and why)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from resnet_serve.contract.preprocess import DecodeOptions, preprocess
from resnet_serve.service.repository import ModelSpec
from resnet_serve.service.settings import CPU_SPINNING, SPIN_UNDER_LOAD, Settings, cpu_count
from resnet_serve.service.tuning import Choice, cache_path, machine_key, save

log = logging.getLogger(__name__)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
# Within this fraction of the best throughput, the cheaper configuration wins: closer
# than that, two measurements on a busy machine do not tell them apart.
TIE = 0.02
# CPU the service spends on a batch beyond the pipeline's run (the batch's hand-offs between
# the event loop and the session's thread, its futures, metrics and statistics), which the
# offline pipeline does not pay: chosen on offline throughput alone, batches came out too
# small to serve (ResNet-20, ninth session in docs/benchmarks.md: a cap of 2 served 0.85
# of a cap of 32 and 4 served 0.94, 0.21-0.27 ms per batch on a 2-core EPYC).
SERVED_BATCH_CPU_S = 0.25e-3


def served_img_s(img_s: float, batch: int, cores: int) -> float:
    """Offline throughput with the service's own cost per batch added, spread over the
    cores: what the candidates are compared on. Nothing for a big model (ResNet-50: under
    0.2% of an image at batch 4); for a small one it tells apart batches the pipeline
    alone finds equal."""
    return 1.0 / (1.0 / img_s + SERVED_BATCH_CPU_S / (batch * max(1, cores)))


@dataclass(frozen=True)
class Candidate:
    max_batch_size: int
    intra_op_threads: int
    sessions_per_device: int
    decode_workers: int


@dataclass
class Measured:
    candidate: Candidate
    img_s: float
    batch_p50_ms: float


def synthetic_jpegs(count: int = 8, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """Photo-sized JPEGs (quality 90) of smooth colour fields with grain, seeded: what the
    background search decodes when no real images are at hand."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    w, h = size
    for _ in range(count):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field_ = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
        grain = rng.normal(0, 12, field_.shape)
        pixels = np.clip(field_ + grain, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _session(spec: ModelSpec, threads: int, busy: bool = False) -> Any:
    """The service's session options; under load (``busy``) its batches run on a
    non-spinning copy."""
    import onnxruntime as ort

    from resnet_serve.service.sessions import session_options

    opts = session_options(threads, CPU_SPINNING and (SPIN_UNDER_LOAD or not busy), None)
    return ort.InferenceSession(str(spec.onnx_path), opts, providers=["CPUExecutionProvider"])


def _engine(session: Any, batch: np.ndarray, seconds: float) -> Measured:
    session.run(["logits"], {"images": batch})  # first-run allocations stay out
    ms: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(ms) < 2:
        t = time.perf_counter()
        session.run(["logits"], {"images": batch})
        ms.append((time.perf_counter() - t) * 1000.0)
    n = len(batch)
    cand = Candidate(n, session.get_session_options().intra_op_num_threads, 1, 0)
    return Measured(cand, n * len(ms) / (time.perf_counter() - start), float(np.median(ms)))


def pipeline(
    spec: ModelSpec, images: Sequence[bytes], c: Candidate, seconds: float,
    options: DecodeOptions | None = None,
) -> Measured:  # fmt: skip
    """Decode threads fill a queue; one thread per session runs full batches from it; the
    rate is counted at the sessions from the end of their first batch."""
    options = options or DecodeOptions()
    sessions = [_session(spec, c.intra_op_threads, True) for _ in range(c.sessions_per_device)]
    shape = (c.max_batch_size, *spec.input_shape)
    for s in sessions:
        s.run(["logits"], {"images": np.zeros(shape, np.uint8)})
    ready: queue.Queue[np.ndarray] = queue.Queue(maxsize=2 * c.max_batch_size * len(sessions))
    stop = threading.Event()
    counter = iter(range(1 << 62))
    errors: list[BaseException] = []

    def decode() -> None:
        try:
            while not stop.is_set():
                i = next(counter)
                arr = preprocess(images[i % len(images)], 0, spec.preprocess, options)
                while not stop.is_set():
                    try:
                        ready.put(arr, timeout=0.05)
                        break
                    except queue.Full:
                        pass
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def infer(session: Any, out: list[tuple[float, float]]) -> None:
        buf = np.empty(shape, np.uint8)
        deadline = None
        while not stop.is_set():
            k = 0
            while k < c.max_batch_size and not stop.is_set():
                try:
                    buf[k] = ready.get(timeout=0.05)
                    k += 1
                except queue.Empty:
                    pass
            if stop.is_set():
                return
            t = time.perf_counter()
            session.run(["logits"], {"images": buf})
            now = time.perf_counter()
            out.append((now, (now - t) * 1000.0))
            # The first batch waited for the decoders to start: the clock starts after it.
            deadline = deadline or now + seconds
            if now >= deadline and len(out) >= 3:
                return

    threads = [threading.Thread(target=decode, daemon=True) for _ in range(c.decode_workers)]
    results: list[list[tuple[float, float]]] = [[] for _ in sessions]
    runners = [
        threading.Thread(target=infer, args=(s, r), daemon=True)
        for s, r in zip(sessions, results, strict=True)
    ]
    for t in [*threads, *runners]:
        t.start()
    for t in runners:
        t.join()
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("decoding failed while tuning") from errors[0]
    img_s = sum((len(r) - 1) * c.max_batch_size / (r[-1][0] - r[0][0]) for r in results)
    p50 = float(np.median([ms for r in results for _, ms in r[1:]]))
    return Measured(c, img_s, p50)


def candidates(cores: int, batches: Sequence[int]) -> list[Candidate]:
    """Every split of ``cores`` into sessions x intra-op threads, with decode threads one
    per core or one in all, at each batch size."""
    out = []
    for b in batches:
        for sessions in sorted({1, min(2, cores)}):
            full = max(1, cores // sessions)
            for threads in sorted({full, max(1, full - 1)}, reverse=True):
                for decode in sorted({cores, 1}, reverse=True):
                    out.append(Candidate(b, threads, sessions, decode))
    return out


def _better(a: Measured, b: Measured, cores: int) -> bool:
    """Whether ``a`` beats ``b`` as served: clearly faster, or as fast and cheaper."""
    fa, fb = (served_img_s(m.img_s, m.candidate.max_batch_size, cores) for m in (a, b))
    if fa > fb * (1 + TIE):
        return True
    if fa < fb * (1 - TIE):
        return False
    cost = lambda m: (m.candidate.max_batch_size, m.candidate.intra_op_threads,  # noqa: E731
                      m.candidate.sessions_per_device)  # fmt: skip
    return cost(a) < cost(b)


def _row(m: Measured, stage: str, cores: int) -> dict[str, Any]:
    row = {**asdict(m.candidate), "img_s": round(m.img_s, 2),
           "batch_p50_ms": round(m.batch_p50_ms, 2), "stage": stage}  # fmt: skip
    if stage == "pipeline":
        row["served_img_s"] = round(served_img_s(m.img_s, m.candidate.max_batch_size, cores), 2)
    return row


def search(
    spec: ModelSpec,
    images: Sequence[bytes],
    *,
    budget_s: float = 60.0,
    latency_bound_ms: float = 1000.0,
    max_batch: int = 32,
    rounds: int = 1,
    full: bool = False,
    log_fn: Callable[[str], None] = log.info,
) -> Choice:
    """The best configuration found within about ``budget_s`` seconds. ``full``: pipelines
    at every batch size within 20% of the engine's best, not only the two likeliest;
    ``rounds``: each pipeline measured that many times, interleaved, its best round kept
    (other work on the machine only ever slows a round down)."""
    started = time.perf_counter()
    key = machine_key(spec)
    cores = cpu_count()
    sizes = [b for b in BATCH_SIZES if b <= max_batch]
    options = DecodeOptions()
    arrays = [preprocess(d, 0, spec.preprocess, options) for d in images[:max_batch]]
    # A third of the budget for the engine alone, the rest for the pipelines.
    step = max(0.3, budget_s / 3 / len(sizes) / rounds)
    session = _session(spec, cores)
    batches = {b: np.stack([arrays[i % len(arrays)] for i in range(b)]) for b in sizes}
    engine_best: dict[int, Measured] = {}
    for r in range(rounds):
        for b in sizes:
            m = _engine(session, batches[b], step)
            if b not in engine_best or m.img_s > engine_best[b].img_s:
                engine_best[b] = m
            log_fn(f"tuning {spec.name} (round {r + 1}/{rounds}): onnxruntime batch {b}: "
                   f"{m.img_s:.1f} img/s")  # fmt: skip
    del session
    engine = [engine_best[b] for b in sizes]
    within = [m for m in engine if m.batch_p50_ms <= latency_bound_ms] or engine[:1]
    best = max(m.img_s for m in within)
    # The batch sizes worth a pipeline: the smallest within 5% of the best, and the best.
    fast = [m.candidate.max_batch_size for m in within if m.img_s >= 0.95 * best]
    top = max(within, key=lambda m: m.img_s).candidate.max_batch_size
    if full:
        fast = [m.candidate.max_batch_size for m in within if m.img_s >= 0.6 * best]
    plan = candidates(cores, sorted({*(fast if full else fast[:1]), top}))
    left = budget_s - (time.perf_counter() - started)
    per = max(0.5, left / max(1, len(plan) * rounds))
    best_of: dict[Candidate, Measured] = {}
    for r in range(rounds):
        for c in plan:
            m = pipeline(spec, images, c, per, options)
            if c not in best_of or m.img_s > best_of[c].img_s:
                best_of[c] = m
            log_fn(
                f"tuning {spec.name} (round {r + 1}/{rounds}): batch {c.max_batch_size}, "
                f"{c.sessions_per_device} session(s) x {c.intra_op_threads} threads, "
                f"{c.decode_workers} decode: {m.img_s:.1f} img/s, "
                f"batch p50 {m.batch_p50_ms:.1f} ms"
            )
    measured = list(best_of.values())
    ok = [m for m in measured if m.batch_p50_ms <= latency_bound_ms] or measured
    winner = ok[0]
    for m in ok[1:]:
        if _better(m, winner, cores):
            winner = m
    return Choice(
        model=spec.name,
        key=key,
        settings=asdict(winner.candidate),
        img_s=winner.img_s,
        batch_p50_ms=winner.batch_p50_ms,
        latency_bound_ms=latency_bound_ms,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - started, 1),
        measured=[
            _row(m, stage, cores)
            for stage, ms in (("engine", engine), ("pipeline", measured))
            for m in ms
        ],
    )


def tune_in_background(specs: Sequence[ModelSpec], settings: Settings) -> threading.Thread:
    """``auto`` found no tuning: measure after ready, at the lowest CPU priority (onnxruntime's
    and the decode threads, created by this thread, inherit it, so requests come first),
    and cache the result for the next start; this process keeps its settings."""

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        images = synthetic_jpegs()
        for spec in specs:
            try:
                choice = search(
                    spec, images, budget_s=settings.tuning_budget_s,
                    latency_bound_ms=settings.latency_slo_ms / 2,
                    max_batch=settings.max_batch_size, log_fn=log.debug,
                )  # fmt: skip
                path = cache_path(choice.key)
                save([choice], path)
                log.info(
                    "%s: tuned in %.0fs: %s (%.1f img/s offline); cached in %s, applied at the "
                    "next start",
                    spec.name, choice.seconds, choice.settings, choice.img_s, path,
                )  # fmt: skip
            except Exception:
                log.warning("%s: tuning in the background failed", spec.name, exc_info=True)

    thread = threading.Thread(target=run, name="tuning", daemon=True)
    thread.start()
    return thread
