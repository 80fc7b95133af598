"""How the metrics' values are kept, apart from which metrics there are (service/metrics.py):
label children remembered (``Labeled``), gauges read from callables (``LiveGauges``), and
prometheus-client's multiprocess mode under ``--workers`` (``multiprocess``, and the
collector that refreshes this process's live gauges before reading every process's files).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

# How often each worker of ``--workers`` writes its live gauges (read from callables in one
# process) to the shared files, besides at each scrape it answers itself.
LIVE_REFRESH_S = 0.25


def multiprocess() -> bool:
    """prometheus-client's multiprocess mode: the directory is set, and was set when
    prometheus_client was imported (it chooses its value storage then)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) and (
        values.ValueClass is not values.MutexValue
    )


def clear_files(path: str) -> None:
    """The multiprocess directory ``path`` emptied of an earlier run's files, made if need
    be: a directory given by the operator keeps them, and they would add to this run's
    counters and, for gauges of processes long gone, to its live sums."""
    Path(path).mkdir(parents=True, exist_ok=True)
    for f in Path(path).glob("*.db"):
        f.unlink()


class Labeled:
    """``metric.labels(*values)``, remembered: prometheus-client builds and checks the label
    tuple and takes a lock on every call, several Python calls per request on the event
    loop for a child that never changes. Only for labels of a bounded set of values (the
    endpoint table, served models, statuses), as every label of the service is."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class LiveGauges:
    """Gauges whose value is read from a callable: at each scrape in one process; under
    multiprocess mode (where a scrape reads files, not callables) written to this
    process's file at each scrape it answers (``Refreshing``) and every LIVE_REFRESH_S by
    a thread."""

    def __init__(self, multiprocess: bool) -> None:
        self.multiprocess = multiprocess
        self._live: list[tuple[Any, Callable[[], float]]] = []
        self._lock = threading.Lock()

    def add(self, child: Any, fn: Callable[[], float]) -> None:
        if not self.multiprocess:
            child.set_function(fn)
            return
        with self._lock:
            first = not self._live
            self._live.append((child, fn))
        child.set(fn())
        if first:
            threading.Thread(target=self._refresh_forever, name="metrics-live", daemon=True).start()

    def refresh(self) -> None:
        with self._lock:
            live = list(self._live)
        for child, fn in live:
            child.set(fn())

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(LIVE_REFRESH_S)
            self.refresh()


class Refreshing(MultiProcessCollector):
    """Every process's files, after writing this process's live gauges to its own."""

    def __init__(self, registry: CollectorRegistry, refresh: Callable[[], None]) -> None:
        super().__init__(registry)
        self._refresh = refresh

    def collect(self) -> Iterable[Metric]:
        self._refresh()
        return super().collect()
