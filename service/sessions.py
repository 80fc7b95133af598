"""onnxruntime sessions per model and device, each driven by its own worker thread.

A session is only ever run from its worker's single thread, so one slow batch never
blocks the event loop and two batches never contend for the same session.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnxruntime as ort

from resnet_serve.contract.schema import GRAPH_OUTPUTS, INPUT, ModelSpec
from resnet_serve.service import affinity
from resnet_serve.service.devices import Device, providers_for, resolve_devices
from resnet_serve.service.settings import Settings, cpu_count

log = logging.getLogger(__name__)

# What classification and the default embedding need; stage maps are asked for by name.
DEFAULT_OUTPUTS: tuple[str, ...] = GRAPH_OUTPUTS


class Runner(Protocol):
    """What the batcher and the pool need of a worker (``Worker``, or a test's fake)."""

    name: str
    device: Device
    executor: ThreadPoolExecutor

    def run(
        self, images: np.ndarray, names: tuple[str, ...] = DEFAULT_OUTPUTS, busy: bool = False
    ) -> list[np.ndarray]: ...

    def recreate(self) -> None: ...


class Lone:
    """One session on all the cores a model's sessions split among them, shared by its
    workers, for a lone batch (nothing else in flight): one set of threads, warm whichever
    worker's thread runs it, never two sets spinning against each other."""

    def __init__(self, path: str, options: ort.SessionOptions) -> None:
        self.path, self.options = path, options
        # Held by the worker whose batch runs on it: never two runs with every core each.
        self.lock = threading.Lock()
        self.recreate()

    def recreate(self) -> None:
        self.session = ort.InferenceSession(self.path, self.options, ["CPUExecutionProvider"])


@dataclass(eq=False)
class Worker:
    """One session and the one thread that runs it; optionally a non-spinning copy of the
    session (``calm_options``) for the batches of busy spells, run by the same thread, so
    the two never run at once; and where the model's sessions split the cores, the shared
    ``Lone`` session for lone batches."""

    path: str
    options: ort.SessionOptions
    device: Device
    name: str
    providers: list[str | tuple[str, dict[str, str]]]
    io_binding: bool = False
    cpu: int | None = None  # the core its thread is pinned to (--cpu-affinity)
    calm_options: ort.SessionOptions | None = None
    lone: Lone | None = None
    session: ort.InferenceSession = field(init=False)
    calm: ort.InferenceSession | None = field(init=False, default=None)
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        if self.cpu is not None:
            self.executor.submit(affinity.pin_this_thread, self.cpu).result()
        self._own()

    def _create(self, options: ort.SessionOptions) -> ort.InferenceSession:
        return ort.InferenceSession(self.path, sess_options=options, providers=self.providers)

    def run(
        self, images: np.ndarray, names: tuple[str, ...] = DEFAULT_OUTPUTS, busy: bool = False
    ) -> list[np.ndarray]:
        """The named outputs for a batch (only those: a feature map nobody asked for is
        never copied out). ``busy``: other images wait or decode meanwhile, so the batch
        runs on the non-spinning copy where there is one; otherwise on the shared ``Lone``
        session where there is one and no other worker's batch runs on it."""
        lone = self.lone
        if not busy and lone is not None and lone.lock.acquire(blocking=False):
            try:
                return list(lone.session.run(list(names), {INPUT: images}))
            finally:
                lone.lock.release()
        session = self.calm if busy and self.calm is not None else self.session
        if self.io_binding:
            # The uint8 batch goes to the device in one copy and each output comes back in
            # one copy into host memory; nothing else crosses the bus.
            binding = session.io_binding()
            binding.bind_cpu_input(INPUT, images)
            for name in names:
                binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding)
            return list(binding.copy_outputs_to_cpu())
        return list(session.run(list(names), {INPUT: images}))

    def recreate(self) -> None:
        """Fresh sessions after a failed run: whatever state the failure left (a CUDA
        error poisons the context's stream, an arena may stay fragmented) goes with it."""
        self._own()
        if self.lone is not None:
            self.lone.recreate()

    def _own(self) -> None:
        self.session = self._create(self.options)
        if self.calm_options is not None:
            self.calm = self._create(self.calm_options)


def session_options(threads: int, spin: bool, cores: list[int] | None) -> ort.SessionOptions:
    """A CPU or GPU session's options; ``cores``: where its threads are pinned, if anywhere."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    if cores and threads > 1:
        opts.add_session_config_entry(
            "session.intra_op_thread_affinities", affinity.pool_affinities(cores)
        )
    return opts


class SessionPool:
    """The workers of one model; ``acquire`` hands out an idle one."""

    def __init__(self, workers: list[Runner], buckets: list[int], decodes: bool = False) -> None:
        self.workers = workers
        self.buckets = buckets
        # Each session's thread decodes its batch's images itself, right before the run
        # (``batchrecord.Deferred``), under load as for a lone request; see ``load``.
        self.decodes = decodes
        self._idle: asyncio.Queue[Runner] | None = None
        self._retired: set[Runner] = set()
        self.on_broken: Callable[[], None] | None = None  # once no worker is left

    @property
    def healthy(self) -> int:
        """Workers not retired: able to run."""
        return len(self.workers) - len(self._retired)

    @property
    def broken(self) -> bool:
        """No worker left that can run: the model cannot serve."""
        return self.healthy == 0

    async def recover(self, worker: Runner) -> bool:
        """Recreate a worker's session after a failure, on its own thread. A worker
        whose session cannot be recreated is retired (never handed out again)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(worker.executor, worker.recreate)
            log.warning("%s: session recreated after a failure", worker.name)
            return True
        except Exception:
            log.exception("%s: session could not be recreated; retired", worker.name)
            self._retired.add(worker)
            if self.broken and self.on_broken is not None:
                self.on_broken()
            return False

    @classmethod
    def load(cls, spec: ModelSpec, settings: Settings) -> SessionPool:
        devices = resolve_devices(settings.device)
        # Divided among the sessions of this model only, which run at the same time under
        # load. Other models' sessions are not counted: they are busy when this one is not,
        # and a fixed fraction each would leave a lone busy model on a fraction of the cores.
        threads = settings.intra_op_threads or max(1, cpu_count() // settings.sessions_per_device)
        cpus = affinity.process_cpus() if settings.cpu_affinity else []
        # A lone batch (nothing else in flight) has the model's cores to itself: where they
        # are split among sessions, it runs on one shared session with all of them, the split
        # sessions (not spinning, unless --spin-under-load) taking the busy spells (ResNet-50,
        # tuned to 2 sessions x 1 thread, one client: p50 38.7 ms on one thread, about 22 on
        # two; docs/benchmarks.md, ninth session).
        # Not with --cpu-affinity, where every thread has its own core.
        wide = min(cpu_count(), threads * settings.sessions_per_device)
        lone = None
        if wide > threads and not cpus and all(d.kind == "cpu" for d in devices):
            lone = Lone(str(spec.onnx_path), session_options(wide, settings.cpu_spinning, None))
        spin = settings.cpu_spinning and (lone is None or settings.spin_under_load)
        # One intra-op thread has no pool to spin; a GPU session's CPU threads barely run.
        twin = spin and not settings.spin_under_load and threads > 1
        workers: list[Runner] = []
        for device in devices:
            for i in range(settings.sessions_per_device):
                cores = None
                if cpus and device.kind == "cpu":
                    cores = affinity.session_cores(cpus, i, threads)
                    log.info("%s session %d: threads on CPUs %s", spec.name, i, cores)
                opts = session_options(threads, spin, cores)
                calm = None
                if twin and device.kind == "cpu":
                    calm = session_options(threads, False, cores)
                name = f"ort-{spec.name}-{device}-{i}"
                io_binding = (
                    settings.io_binding if settings.io_binding is not None
                    else device.kind == "cuda"
                )  # fmt: skip
                providers = providers_for(device, settings)
                cpu = cores[0] if cores else None
                path = str(spec.onnx_path)
                workers.append(
                    Worker(path, opts, device, name, providers, io_binding, cpu, calm, lone)
                )
        # The session's thread decodes when the process has one session of one intra-op
        # thread (CPU) and one decode thread (--workers N on N cores): one core's work either
        # way, two hand-offs between threads saved per image (ResNet-20 +5-6%). Not with an
        # intra-op pool (its threads would wait), nor two sessions (their decoding contends
        # for the GIL: 9% slower); docs/benchmarks.md, seventh session.
        decodes = threads == 1 and all(d.kind == "cpu" for d in devices)
        decodes = decodes and settings.sessions_per_device == 1 == settings.decode_threads
        first = workers[0]
        copy = ", and a non-spinning copy for busy spells" if getattr(first, "calm", None) else ""
        if lone is not None:
            copy += f"; a lone batch on one shared session of {wide} threads"
        log.info(
            "%s: %d session(s) on %s, %d intra-op thread(s) each%s, providers %s",
            spec.name, len(workers), ", ".join(map(str, devices)), threads, copy,
            first.session.get_providers(),
        )  # fmt: skip
        if decodes:
            log.info("%s: images decoded on the sessions' threads, before each run", spec.name)
        return cls(workers, settings.buckets_for(devices[0].kind), decodes)

    def warmup(
        self,
        sizes: list[int],
        shape: tuple[int, int, int],
        stop: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> bool:
        """Run each batch size once on every session (blocking), so that no request pays
        for a first shape (allocations, kernel selection, cuDNN search). Checks ``stop``
        between runs; False if it was set before the end. ``progress(done, total)`` after
        each run."""
        # Each copy of a session (the non-spinning one too) runs every size.
        runs = [
            (worker, busy)
            for worker in self.workers
            for busy in (
                (False, True)
                if getattr(worker, "calm", None) or getattr(worker, "lone", None)
                else (False,)
            )
        ]
        total, done = len(runs) * len(sizes), 0
        for worker, busy in runs:
            for i, b in enumerate(sizes):
                if stop is not None and stop.is_set():
                    return False
                batch = np.zeros((b, *shape), dtype=np.uint8)
                if i == 0:
                    # The first run on the worker's own thread, which runs every batch: it
                    # starts that thread and its onnxruntime per-thread state. Measured on
                    # ResNet-20 (tools/cold_start.py, 5 runs each), the first request's
                    # inference took 0.99-1.06 ms this way, 1.03-4.37 ms without.
                    worker.executor.submit(worker.run, batch, DEFAULT_OUTPUTS, busy).result()
                else:
                    worker.run(batch, DEFAULT_OUTPUTS, busy)
                done += 1
                if progress is not None:
                    progress(done, total)
        return True

    def first_per_device(self) -> list[Runner]:
        """One worker per device: what differs between devices is the kernels, not the
        sessions on one device, which run the same kernels."""
        seen: dict[Device, Runner] = {}
        for w in self.workers:
            seen.setdefault(w.device, w)
        return list(seen.values())

    def start(self) -> None:
        self._idle = asyncio.Queue()
        for w in self.workers:
            self._idle.put_nowait(w)

    async def acquire(self) -> Runner:
        assert self._idle is not None, "start() the pool inside the event loop first"
        return await self._idle.get()

    def release(self, worker: Runner) -> None:
        assert self._idle is not None
        if worker not in self._retired:
            self._idle.put_nowait(worker)

    def close(self) -> None:
        """After the drain: a run still in progress (past the drain timeout, or a warmup
        run) is not waited for, so it cannot hold the shutdown."""
        for w in self.workers:
            w.executor.shutdown(wait=False, cancel_futures=True)
