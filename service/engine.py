"""The inference core: every protocol's requests take this one path to onnxruntime.

``Engine.infer(model, parse, deadline=..., gone=...)`` owns what every protocol needs:
readiness, admission (one ``Ticket`` that cannot leak), reading the request (``parse``,
the codec's, run after the request is announced so that batches forming now wait for
it), checking what it asks for against the model, decoding in the decode pool, the
deadline, the client going away, and the outputs (``postprocess.Outputs``). It knows
nothing of HTTP or gRPC: codecs parse into a ``Job`` and encode the ``Outputs``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from resnet_serve.contract.preprocess import preprocess
from resnet_serve.contract.schema import LOGITS, PROBABILITIES, ModelSpec
from resnet_serve.service.batcher import Batcher, Ticket
from resnet_serve.service.batchrecord import Deferred
from resnet_serve.service.decoding import Clocked, decode_all, watch
from resnet_serve.service.errors import (
    InvalidParameterError,
    ModelNotFoundError,
    NotReadyError,
    RequestTimeoutError,
)
from resnet_serve.service.postprocess import Outputs, Pooling
from resnet_serve.service.reading import STALL_S, ByteBudget, Reading

if TYPE_CHECKING:
    from resnet_serve.service.runtime import Runtime, ServedModel


@dataclass(frozen=True)
class Job:
    """What a codec parsed: the images (encoded files, or preprocessed uint8
    ``[N, crop, crop, 3]``), the outputs the answer needs (graph outputs, ``probabilities``),
    the pooling of a stage output, and the codec's own parsed request, handed back."""

    images: list[bytes] | np.ndarray
    outputs: tuple[str, ...]
    pooling: Pooling | None = None
    request: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class Result:
    model: ServedModel
    job: Job
    outputs: Outputs


Parse = Callable[[ModelSpec, Reading], Awaitable[Job]]
T = TypeVar("T")


def graph_outputs(spec: ModelSpec, job: Job) -> tuple[str, ...]:
    """The graph outputs ``job`` needs, each once; 422 for one the model lacks or a
    pooling that does not apply."""
    known = (*spec.output_names, PROBABILITIES)
    unknown = [n for n in job.outputs if n not in known]
    if unknown:
        raise InvalidParameterError(
            f"model {spec.name} has no output {', '.join(unknown)} (outputs: {', '.join(known)})"
        )
    if job.pooling is not None and job.pooling.how != "none":
        vectors = [n for n in job.outputs if n not in spec.features]
        if vectors:
            # A vector has no positions to pool over.
            stages = ", ".join(spec.features) or "none exported"
            raise InvalidParameterError(
                f"layer {vectors[0]!r} is a vector, not a feature map: pool applies "
                f"to stages ({stages}); ask for it with pool=none"
            )
    return tuple(dict.fromkeys(LOGITS if n == PROBABILITIES else n for n in job.outputs))


class Engine:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.metrics = runtime.metrics
        # Large bodies parsed at once, at most: each may inflate to several times its size
        # (a gzip body to --max-body-bytes, JSON to its objects), so memory stays bounded
        # by this many, whatever the number of clients.
        self._parsing = asyncio.Semaphore(max(1, self.settings.decode_threads))
        self.budget = ByteBudget(self.settings.max_buffered_bytes)

    async def parse(self, fn: Callable[[], T]) -> T:
        """``fn()`` (a parse whose cost grows with the body) off the event loop, a bounded
        number at once; the codecs call it for bodies too large to parse inline."""
        async with self._parsing:
            return await asyncio.to_thread(fn)

    def model(self, name: str | None) -> ServedModel:
        """A served model by name (None: the default one); 404 otherwise."""
        rt = self.runtime
        try:
            return rt.models[name or rt.default_model]
        except KeyError:
            raise ModelNotFoundError(str(name), list(rt.models)) from None

    def deadline(self, arrival: float, client_ms: float | None = None) -> float:
        """``time.perf_counter()`` by which a request that arrived at ``arrival`` must be
        answered: the server's limit or the client's shorter one."""
        limit_ms = self.settings.request_timeout_ms
        if client_ms is not None:
            limit_ms = min(limit_ms, client_ms)
        return arrival + limit_ms / 1000.0

    def _batcher(self, model: ServedModel) -> Batcher:
        # Not refused while draining: a request that arrived before SIGTERM was accepted
        # and gets its answer; the front ends stop new ones from arriving.
        if not model.serving or model.batcher is None:
            raise NotReadyError(f"model {model.name} is not ready")
        return model.batcher

    async def infer(
        self,
        model: ServedModel,
        parse: Parse,
        *,
        endpoint: str,
        deadline: float,
        gone: Callable[[], Awaitable[object]] | None = None,
    ) -> Result:
        """One request: ``parse`` reads and parses it for ``model`` (``reading``: its bytes
        against the budget, its announcement while they arrive); the work is bounded
        by ``deadline`` and by ``gone()`` (awaited once the request is read: completes if
        the client leaves); either way out cancels the queued work, never computed."""
        batcher = self._batcher(model)
        stall_s = min(STALL_S, batcher.delay_s)
        with batcher.admission() as ticket, Reading(ticket, self.budget, stall_s) as reading:
            job = await parse(model.spec, reading)
            names = graph_outputs(model.spec, job)
            if PROBABILITIES in job.outputs:  # computed with the batch (batchrecord.run_batch)
                names = (*names, PROBABILITIES)
            n = len(job.images)
            self.metrics.images_of(endpoint, model.name).inc(n)
            ticket.admit(n)
            work = self._run(model, batcher, ticket, job, names)
            arrays = await self._guard(work, model, n, deadline, gone)
        return Result(model, job, Outputs(arrays))

    async def _guard(
        self,
        work: Coroutine[Any, Any, dict[str, np.ndarray]],
        model: ServedModel,
        images: int,
        deadline: float,
        gone: Callable[[], Awaitable[object]] | None,
    ) -> dict[str, np.ndarray]:
        # ``work`` runs in this task, and a timer and a callback cancel the task, as
        # asyncio.timeout() does: no task of its own per request (created, registered,
        # scheduled, and awaited an event-loop turn later) and no task watching the client.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        timeout = max(0.0, deadline - time.perf_counter())
        why: list[str] = []
        running = True

        def stop(reason: str) -> None:
            if running and not why:
                why.append(reason)
                task.cancel()

        def left(_: object) -> None:
            stop("gone")

        timer = loop.call_later(timeout, stop, "timeout")
        watch = gone() if gone is not None else None
        watcher = None
        if watch is not None:
            # A future (the connection's, gRPC's) is watched as it is; anything else (an
            # ASGI server without that future) needs a task of its own.
            watcher = watch if isinstance(watch, asyncio.Future) else asyncio.ensure_future(watch)
            watcher.add_done_callback(left)
        try:
            # Cancelled, the work unwinds before this returns: decoding that cannot be
            # interrupted is counted as held before the ticket closes.
            return await work
        except asyncio.CancelledError:
            # Ours alone (not also the server's, at the drain timeout): answered here.
            if not why or task.uncancel() > 0:
                raise
        finally:
            running = False
            timer.cancel()
            if watcher is not None:
                watcher.remove_done_callback(left)
                if watcher is not watch:
                    watcher.cancel()
        if why[0] == "gone":
            self.metrics.rejected.labels(model.name, "client_gone").inc(images)
            # Nobody is listening; the status is for the logs and metrics only.
            raise RequestTimeoutError("client disconnected")
        raise RequestTimeoutError(f"request timed out after {timeout:g}s")

    async def _run(
        self, model: ServedModel, batcher: Batcher, ticket: Ticket, job: Job,
        names: tuple[str, ...],
    ) -> dict[str, np.ndarray]:  # fmt: skip
        arrays: list[np.ndarray | Deferred]
        limit_s = self.settings.decode_timeout_ms / 1000.0
        deferred: list[Clocked] = []
        if isinstance(job.images, np.ndarray):
            arrays = list(self._check_preprocessed(model.spec, job.images))
        elif batcher.pool.decodes or (len(job.images) == 1 and batcher.alone()):
            # Decoded by the session's thread right before the run: one hand-off between
            # threads instead of three (to a decode thread, back, to the session's). Alone,
            # nothing else would use a decode thread meanwhile; with sessions that decode
            # (``SessionPool.decodes``), always.
            deferred = [
                Clocked(functools.partial(self.preprocess_one, blob, i, model=model))
                for i, blob in enumerate(job.images)
            ]
            arrays = list(deferred)
        else:
            arrays = await decode_all(
                self.runtime.decode_pool,
                job.images,
                functools.partial(self.preprocess_one, model=model),
                limit_s,
                ticket,
                # Two per decode thread: none idles between two of this request's images,
                # and another request's image waits behind at most these.
                window=2 * self.settings.decode_threads,
            )
        futures = ticket.submit(arrays, names)
        unwatch = [
            watch(f, d, limit_s, i) for i, (f, d) in enumerate(zip(futures, deferred, strict=False))
        ]
        try:
            # One image (the common request): its future itself, not a gathering of one.
            results = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()  # the batcher drops what is still queued
            raise
        finally:
            for stop_watching in unwatch:
                stop_watching()
        if len(results) == 1:
            return {name: results[0][name][np.newaxis] for name in names}
        return {name: np.stack([r[name] for r in results]) for name in names}

    @staticmethod
    def _check_preprocessed(spec: ModelSpec, images: np.ndarray) -> np.ndarray:
        expected = (spec.input_shape, np.dtype(np.uint8))
        if images.ndim != 4 or (images.shape[1:], images.dtype) != expected:
            raise InvalidParameterError(
                f"expected uint8 images of shape [N, {', '.join(map(str, expected[0]))}], "
                f"got {images.dtype} {list(images.shape)}"
            )
        return images

    def preprocess_one(self, data: bytes, index: int, *, model: ServedModel) -> np.ndarray:
        """One image, on a decode thread."""
        t = time.perf_counter()
        out = preprocess(data, index, model.spec.preprocess, self.runtime.decode_options)
        self.metrics.preprocess_duration_of(model.name).observe(time.perf_counter() - t)
        return out
