"""Faults for the tests to put into a served model inside the test's own process
(a ThreadServer's runtime): failed runs, sessions that cannot be recreated, slow decoding."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from resnet_serve.service.runtime import Runtime, ServedModel


def _device_lost(*_args: Any) -> Any:
    raise RuntimeError("device lost (simulated)")


def retire_sessions(model: ServedModel) -> None:
    """Every session of ``model`` fails its next run and cannot be recreated: after one
    failed batch the model has no session left and is not ready."""
    for worker in model.pool.workers:
        for method in ("run", "recreate"):
            setattr(worker, method, _device_lost)


def fail_runs(model: ServedModel, count: int) -> None:
    """The next ``count`` runs of each of ``model``'s sessions raise; the sessions are
    recreated after each, as after a real failure, and then run again."""
    for worker in model.pool.workers:
        real: Callable[..., Any] = worker.run
        left = [count]

        def run(*args: Any, real: Callable[..., Any] = real, left: list[int] = left) -> Any:
            if left[0] > 0:
                left[0] -= 1
                raise RuntimeError("CUDA error: out of memory (simulated)")
            return real(*args)

        worker.run = run  # type: ignore[method-assign]


def hold_decoding(runtime: Runtime) -> threading.Event:
    """Every image's decoding waits until the returned event is set."""
    gate = threading.Event()
    real = runtime.engine.preprocess_one

    def held(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return real(*args, **kwargs)

    runtime.engine.preprocess_one = held  # type: ignore[method-assign]
    return gate


def hold_runs(model: ServedModel) -> tuple[threading.Event, threading.Event]:
    """Every run of ``model``'s sessions waits for the second event (the gate) once it
    has set the first (entered): a test can fill the queue behind a run it knows started."""
    entered, gate = threading.Event(), threading.Event()
    for worker in model.pool.workers:
        real: Callable[..., Any] = worker.run

        def run(*args: Any, real: Callable[..., Any] = real) -> Any:
            entered.set()
            gate.wait(30)
            return real(*args)

        worker.run = run  # type: ignore[method-assign]
    return entered, gate
