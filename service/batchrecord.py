"""What a batch is made of (queued images) and what one executed batch leaves behind: the
per-stage metrics, Triton's statistics (service/stats.py) and each request's
Server-Timing split (service/timing.py). One place, so that the batcher only batches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from resnet_serve.service.metrics import Metrics
from resnet_serve.service.timing import Timing

# One image's outputs by name (rows of the batch's arrays): logits, embedding, and any
# feature map its request asked for.
Result = dict[str, np.ndarray]


@dataclass(eq=False, slots=True)
class QueuedImage:
    image: np.ndarray
    future: asyncio.Future[Result]
    enqueued: float
    outputs: tuple[str, ...]
    timing: Timing | None  # the submitting request's (Server-Timing)


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

    def failed(self, items: Sequence[QueuedImage]) -> None:
        self._failures.inc()
        self.metrics.stats.of(self.model).failed([i.enqueued for i in items])

    def ran(
        self, items: Sequence[QueuedImage], bucket: int, start: float, assembled: float, ran: float,
        answered: float,
    ) -> None:  # fmt: skip
        """``start``: the batch taken from the queue; ``assembled``: its input array built;
        ``ran``: onnxruntime done; ``answered``: every future set."""
        n = len(items)
        self._inference.observe(ran - start)
        self._batch_size.observe(n)
        self._padding.inc(bucket - n)
        for item in items:
            if item.timing is not None:
                item.timing.batch_done(start - item.enqueued, ran - start, ran)
        self.metrics.stats.of(self.model).executed(
            [item.enqueued for item in items], start, assembled, ran, answered
        )
