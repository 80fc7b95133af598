"""What a batch is made of (queued images) and what one executed batch leaves behind: the
per-stage metrics, Triton's statistics (service/stats.py) and each request's
Server-Timing split (service/timing.py). One place, so that the batcher only batches."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from resnet_serve.contract.schema import LOGITS, PROBABILITIES
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.postprocess import softmax
from resnet_serve.service.sessions import Runner
from resnet_serve.service.timing import Timing

# One image's outputs by name (rows of the batch's arrays): logits, embedding, and any
# feature map its request asked for.
Result = dict[str, np.ndarray]
# An image that the session's thread decodes right before the run (a lone request's).
Deferred = Callable[[], np.ndarray]


@dataclass(eq=False, slots=True)
class QueuedImage:
    image: np.ndarray | Deferred
    future: asyncio.Future[Result]
    enqueued: float
    outputs: tuple[str, ...]
    timing: Timing | None  # the submitting request's (Server-Timing)


def assemble(items: Sequence[QueuedImage], batch: np.ndarray) -> dict[int, Exception]:
    """Fill ``batch``'s first rows with the items' images, decoding the deferred ones; those
    that fail (the client's image: 400) by position, their rows left as they are."""
    failed: dict[int, Exception] = {}
    for i, item in enumerate(items):
        try:
            batch[i] = item.image() if callable(item.image) else item.image
        except Exception as exc:
            failed[i] = exc
    return failed


def run_batch(
    worker: Runner, items: list[QueuedImage], shape: tuple[int, ...], busy: bool
) -> tuple[dict[int, Exception], float, dict[str, np.ndarray]]:
    """On the session's thread: assemble (``assemble``) an input of ``shape``, then run
    what is left. The images that failed, when the batch was assembled, and the outputs
    by name: what any of its images asked for, each once; ``probabilities`` (with the
    logits) as the softmax of the whole batch at once, not one request at a time on the
    event loop."""
    names = tuple(dict.fromkeys(name for item in items for name in item.outputs))
    batch = np.zeros(shape, dtype=np.uint8)
    failed = assemble(items, batch)
    assembled = time.perf_counter()
    if len(failed) == len(items):  # nothing left to run
        return failed, assembled, dict.fromkeys(names, np.empty((len(items), 0)))
    fetch = tuple(name for name in names if name != PROBABILITIES)
    outputs = dict(zip(fetch, worker.run(batch, fetch, busy), strict=True))
    if PROBABILITIES in names:
        outputs[PROBABILITIES] = softmax(outputs[LOGITS])
    return failed, assembled, outputs


def hand_out(
    items: list[QueuedImage], failed: dict[int, Exception], outputs: dict[str, np.ndarray]
) -> list[QueuedImage]:
    """Each waiting item its rows of ``outputs``, or its image's error; the items that ran."""
    for i, item in enumerate(items):
        if item.future.done():  # its request is gone
            continue
        if i in failed:
            item.future.set_exception(failed[i])
        else:
            item.future.set_result({name: outputs[name][i] for name in item.outputs})
    return [item for i, item in enumerate(items) if i not in failed]


class BatchRecord:
    def __init__(self, model: str, metrics: Metrics) -> None:
        self.model = model
        self.metrics = metrics
        self._batch_size = metrics.batch_size.labels(model)
        self._queue_wait = metrics.queue_wait.labels(model)
        self._inference = metrics.inference_duration.labels(model)
        self._padding = metrics.batch_padding.labels(model)
        self._failures = metrics.inference_failures.labels(model)

    def started(self, items: Sequence[QueuedImage], start: float) -> None:
        for item in items:
            self._queue_wait.observe(start - item.enqueued)

    def failed(self, items: Sequence[QueuedImage], error: Exception) -> None:
        """The batch's run raised: every image still waited for gets ``error``."""
        self._failures.inc()
        self.metrics.stats.of(self.model).failed([i.enqueued for i in items])
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    def ran(
        self, items: Sequence[QueuedImage], bucket: int, start: float, assembled: float, ran: float,
        answered: float,
    ) -> None:  # fmt: skip
        """``start``: the batch taken from the queue; ``assembled``: its input array built
        (deferred images decoded); ``ran``: onnxruntime done; ``answered``: every future set."""
        n = len(items)
        self._inference.observe(ran - assembled)
        self._batch_size.observe(n)
        self._padding.inc(bucket - n)
        for item in items:
            if item.timing is not None:
                if callable(item.image):  # its decoding happened in the batch
                    item.timing.decoded(assembled - start)
                item.timing.batch_done(start - item.enqueued, ran - assembled, ran)
        self.metrics.stats.of(self.model).executed(
            [item.enqueued for item in items], start, assembled, ran, answered
        )


def abandon(queue: deque[QueuedImage], error: Exception) -> None:
    """Every image still queued and waited for gets ``error``, unrun; the queue empties."""
    for item in queue:
        if not item.future.done():
            item.future.set_exception(error)
    queue.clear()
