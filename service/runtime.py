"""The served models and their lifecycle: load (sessions, self-check), start (batchers,
warmup in the background), stop (drain). Requests go through ``engine.Engine``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from resnet_serve.contract.preprocess import DecodeOptions, warm_decoder
from resnet_serve.contract.selfcheck import SelfCheck
from resnet_serve.service import remote, tuner, tuning, workers
from resnet_serve.service.batcher import Batcher
from resnet_serve.service.engine import Engine
from resnet_serve.service.loadcheck import self_check
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.repository import ModelSpec, RepositoryError, check_graph, discover
from resnet_serve.service.sessions import SessionPool
from resnet_serve.service.settings import Settings

# Progress lines during a long warmup (every bucket on CUDA), at most this often.
PROGRESS_INTERVAL_S = 5.0

log = logging.getLogger(__name__)


def _ranges(sizes: list[int]) -> str:
    """[1, 2, 3, 4, 8] -> '1-4, 8', for logs."""
    out: list[str] = []
    for n in sizes:
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


async def _in_daemon_thread(fn: Callable[..., object], *args: object) -> None:
    """``fn(*args)`` in a thread of its own that nobody waits for at exit. asyncio.to_thread
    would use the loop's default executor, which ``asyncio.run`` and the interpreter both
    join on the way out: a warmup still running would keep a stopped server alive."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():  # the awaiting task was cancelled
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def target() -> None:
        error: BaseException | None = None
        try:
            fn(*args)
        except BaseException as exc:  # handed to the awaiting task, not lost in this thread
            error = exc
        # A closed loop (RuntimeError): nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=target, name=getattr(fn, "__name__", "worker"), daemon=True).start()
    await done


@dataclass(eq=False)
class ServedModel:
    spec: ModelSpec
    pool: SessionPool
    batcher: Batcher | None = None
    ready: bool = False
    self_check: SelfCheck | None = None
    tuning_choice: tuning.Choice | None = None

    @functools.cached_property
    def name(self) -> str:  # read several times a request: a plain attribute after the first
        return self.spec.name

    @property
    def buckets(self) -> list[int]:
        return self.pool.buckets

    @property
    def serving(self) -> bool:
        """Warmed up, and at least one session still able to run."""
        return self.ready and not self.pool.broken

    def status(self) -> dict[str, Any]:
        """What this process found about the model, beside its model.json."""
        check = self.self_check.to_json() if self.self_check is not None else None
        choice = self.tuning_choice
        tuned = choice.report() if choice is not None else None
        # Where the sessions run: here, or the inference process of --shared-inference.
        shared = any(isinstance(w, remote.RemoteRunner) for w in self.pool.workers)
        return {
            "ready": self.serving, "self_check_result": check, "tuning": tuned,
            "inference": "shared process" if shared else "in process",
            # Where images are decoded under load (``SessionPool.decodes``).
            "decoding": "session threads" if self.pool.decodes else "decode pool",
        }  # fmt: skip


@dataclass(eq=False)
class Runtime:
    settings: Settings
    metrics: Metrics
    models: dict[str, ServedModel]
    decode_options: DecodeOptions
    decode_pool: ThreadPoolExecutor = field(init=False)
    engine: Engine = field(init=False)
    _draining: bool = False
    _drain_hooks: list[Callable[[], None]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    # --tuning auto found nothing cached for these: measured in the background after ready.
    untuned: list[ModelSpec] = field(default_factory=list)
    _warmup: asyncio.Task[None] | None = None
    _stop_warmup: threading.Event = field(default_factory=threading.Event)
    # Called once every model is warm, before ready is announced: the server process (cli)
    # freezes its heap there, which it has to itself (tests and embedders do not).
    before_ready: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.decode_pool = ThreadPoolExecutor(
            max_workers=self.settings.decode_threads, thread_name_prefix="decode"
        )
        self.engine = Engine(self)

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> Runtime:
        """Read the repository and create every session (blocking; fails fast)."""
        specs = discover(settings.repository, settings.models or None)
        names = [s.name for s in specs]
        if settings.default_model and settings.default_model not in names:
            # Checked before any session is created: a typo fails in a second.
            raise RepositoryError(
                f"--default-model {settings.default_model} is not a served model "
                f"(served: {', '.join(names)})"
            )
        models = {}
        untuned = []
        for spec in specs:
            t = time.perf_counter()
            choice, missing = tuning.find(spec, settings)
            tuned = tuning.apply(choice, settings)
            if choice is not None:
                log.info("%s: tuned settings %s (from %s)", spec.name, choice.settings,
                         choice.source)  # fmt: skip
            if missing:
                untuned.append(spec)
            if len(specs) == 1:
                settings = tuned  # one model: its decode threads are the process's
            path = remote.socket_path()
            # --shared-inference: the sessions are the inference process's (service/remote.py).
            pool = remote.load_pool(spec, tuned, path) if path else SessionPool.load(spec, tuned)
            pool.on_broken = functools.partial(workers.mark_ready, False)  # all say not ready
            if (session := getattr(pool.workers[0], "session", None)) is not None:
                check_graph(spec, session)  # not in a worker of --shared-inference
            model = ServedModel(spec, pool, tuning_choice=choice)
            model.self_check = self_check(model.spec, model.pool, tuned, metrics)
            models[spec.name] = model
            log.info("%s: loaded in %.2fs", spec.name, time.perf_counter() - t)
        options = DecodeOptions(
            max_pixels=settings.max_image_pixels,
            formats=tuple(f.upper() for f in settings.image_formats),
            jpeg_draft=settings.jpeg_draft,
        )
        return cls(settings, metrics, models, options, untuned=untuned)

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        """Set by the CLI's signal handler (outside any loop callback): the hooks run on
        the loop, soon after."""
        if value and not self._draining and self._loop is not None:
            for hook in self._drain_hooks:
                self._loop.call_soon_threadsafe(hook)
        self._draining = value

    def on_drain(self, hook: Callable[[], None]) -> None:
        """``hook()`` once draining starts (SIGTERM), on the event loop."""
        self._drain_hooks.append(hook)

    @property
    def default_model(self) -> str:
        return self.settings.default_model or next(iter(self.models))

    @property
    def ready(self) -> bool:
        return (
            not self.draining
            and all(m.serving for m in self.models.values())
            and workers.peers_ready()
        )

    async def start(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        for m in self.models.values():
            m.batcher = Batcher(
                m.name,
                m.pool,
                image_shape=m.spec.input_shape,
                buckets=m.buckets,
                max_batch_delay_ms=s.max_batch_delay_ms,
                max_queue_images=s.max_queue_images,
                metrics=self.metrics,
            )
            m.batcher.start()
            self._export(m, m.batcher)
        self.metrics.latency_slo.set(s.latency_slo_ms / 1000.0)
        first = next(iter(self.models.values())).pool.workers[0]
        if isinstance(first, remote.RemoteRunner):
            provider = first.provider
        else:
            provider = first.session.get_providers()[0]  # type: ignore[attr-defined]
        self.metrics.set_build_info(provider)
        # Warm up in the background: /healthz and /readyz answer meanwhile.
        self._warmup = asyncio.create_task(self._warm_all(), name="warmup")

    def _export(self, m: ServedModel, batcher: Batcher) -> None:
        """The model's limits, its live state (read at each scrape) and its series at 0."""
        pool = m.pool
        self.metrics.add_model(
            m.name,
            precision=str(m.spec.metadata.get("precision", "fp32")),
            max_queue_images=batcher.max_queue_images,
            max_batch_size=batcher.max_batch_size,
            sessions=len(pool.workers),
            admitted=lambda: batcher.pending,
            queued=lambda: batcher.queued,
            healthy_sessions=lambda: pool.healthy,
            ready=lambda: 1.0 if m.serving else 0.0,
        )

    async def _warm_all(self) -> None:
        names = list(self.models)
        loop = asyncio.get_running_loop()
        # As many first decodes as there are decode threads, per model: the pool starts a
        # thread for each while none is idle, and Pillow loads its plugins on the first.
        await asyncio.gather(
            *(
                loop.run_in_executor(self.decode_pool, warm_decoder, m.spec.preprocess, opts)
                for m in self.models.values()
                for opts in [self.decode_options] * self.settings.decode_threads
            )
        )
        for i, m in enumerate(self.models.values()):
            sizes = self.settings.warmup_sizes(m.pool.workers[0].device.kind)
            log.info(
                "%s: warming up batch sizes %s on %d session(s) (model %d of %d; then: %s)",
                m.name, _ranges(sizes), len(m.pool.workers), i + 1, len(names),
                ", ".join(names[i + 1 :]) or "ready",
            )  # fmt: skip
            t = time.perf_counter()
            shape = m.spec.input_shape
            last = [t]

            def progress(done: int, total: int, name: str = m.name, last: list = last) -> None:
                now = time.perf_counter()
                if done < total and now - last[0] >= PROGRESS_INTERVAL_S:
                    last[0] = now
                    log.info("%s: warmup %d of %d runs done", name, done, total)

            await _in_daemon_thread(m.pool.warmup, sizes, shape, self._stop_warmup, progress)
            if self._stop_warmup.is_set():
                return
            m.ready = True
            log.info("%s: warmed up in %.2fs", m.name, time.perf_counter() - t)
        if self.before_ready is not None:
            self.before_ready()
        elapsed = process_age_s()
        self.metrics.time_to_ready.set(elapsed)
        workers.mark_ready()
        log.info("ready: %s, %.2fs after the process started", ", ".join(names), elapsed)
        if self.untuned and workers.worker_index() in (None, 0):  # one measures, not each
            tuner.tune_in_background(self.untuned, self.settings)

    async def stop(self) -> None:
        self.draining = True
        # The warmup thread stops after the run in progress; nothing waits for it here.
        self._stop_warmup.set()
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        for m in self.models.values():
            if m.batcher is not None:
                await m.batcher.close(self.settings.drain_timeout_s)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


def process_age_s() -> float:
    """Seconds since this process started (Linux: from /proc, so the interpreter's own
    start and the imports count too); since this module was imported elsewhere."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22, counted after the parenthesised command name (which may hold spaces).
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / ticks
        with open("/proc/uptime", encoding="ascii") as f:
            return max(0.0, float(f.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
