"""Per-model inference statistics as Triton's statistics extension counts them.

Prometheus histograms (service/metrics.py) answer "how is the service doing"; these
counters answer what Triton's tools ask: perf_analyzer reads ``/v2/models/{m}/stats``
before and after each measurement window and reports the server-side split of its
latency (queue, compute input, compute infer, compute output) from the difference.

The batcher reports each batch once (``ModelStats.executed`` or ``failed``); everything else is
derived here. What Triton calls a request, the batcher sees as images: every image is
one inference (``inference_count``) and, for the per-stage counts, one request, which is
what a V2 request of batch size 1 (perf_analyzer's default) is. Decoding and protocol
parsing happen before the queue, as Triton's frontends parse before its scheduler: they
are not part of these durations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
OUTCOMES = ("success", "fail")
# Triton reports these too; a server without a response cache leaves them at 0.
UNUSED = ("cache_hit", "cache_miss")


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, count: int, ns: int) -> None:
        self.count += count
        self.ns += ns

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    """Executions of one batch size: each stage counted once per execution."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0  # wall clock, ms since the epoch; 0: never
    durations: dict[str, Duration] = field(
        default_factory=lambda: {name: Duration() for name in (*OUTCOMES, *STAGES, *UNUSED)}
    )
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def executed(
        self,
        enqueued: Sequence[float],
        started: float,
        assembled: float,
        ran: float,
        finished: float,
    ) -> None:
        """A batch of ``len(enqueued)`` images that ran (``time.perf_counter`` instants):
        taken from the queue at ``started``, its input array ready at ``assembled``, run
        until ``ran``, its results handed out by ``finished``."""
        n = len(enqueued)
        if n == 0:
            return
        d = self.durations
        self.last_inference_ms = int(time.time() * 1000)
        self.inference_count += n
        self.execution_count += 1
        # Summed, then converted: per image, two Python calls on the event loop.
        since = sum(enqueued)
        d["queue"].add(n, _ns(n * started - since))
        d["success"].add(n, _ns(n * finished - since))
        per_batch = self.batches.setdefault(n, BatchStats())
        stages = (assembled - started, ran - assembled, finished - ran)
        for name, seconds in zip(STAGES[1:], stages, strict=True):
            # Every image of the batch spent the whole stage in it: as in Triton, each
            # request of a batch is charged the batch's compute time.
            d[name].add(n, _ns(seconds) * n)
            getattr(per_batch, name).add(1, _ns(seconds))

    def failed(self, enqueued: Sequence[float]) -> None:
        """A batch whose run raised: its images are failed requests, nothing else."""
        if enqueued:
            now = time.perf_counter()
            self.last_inference_ms = int(time.time() * 1000)
            self.durations["fail"].add(len(enqueued), sum(_ns(now - t) for t in enqueued))


class Stats:
    """Every served model's statistics; read and written on the event loop only."""

    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}

    def add_model(self, name: str) -> None:
        self.models.setdefault(name, ModelStats())

    def of(self, name: str) -> ModelStats:
        """A model's statistics, created at 0 on first use."""
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats
