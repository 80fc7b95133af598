"""The inference process of ``--workers N --shared-inference`` (service/workers.py): the
one process with onnxruntime sessions, serving the workers' runs over a Unix socket
(service/remote.py has the wire format and the workers' side).

Each connection (one per remote runner of a worker) has a thread that reads its requests
and queues them per model. Each session has a thread (its ``Worker.executor``'s, the one
that runs it in a single process too) that takes from its model's queue every waiting
request with the same outputs and image shape, up to the model's largest batch, and runs
them as one batch: requests from different workers that arrived while a run was in
progress share the next run, which is the point of one batcher for all workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from types import FrameType
from typing import Any

import numpy as np

from resnet_serve.service import logs, tuning
from resnet_serve.service.remote import recv_message, send_message, socket_path
from resnet_serve.service.repository import discover
from resnet_serve.service.sessions import SessionPool, Worker
from resnet_serve.service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One worker's batch, waiting for the run that includes it."""

    images: np.ndarray
    names: tuple[str, ...]
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[np.ndarray] = field(default_factory=list)
    error: str | None = None

    @property
    def key(self) -> tuple[tuple[str, ...], tuple[int, ...], str]:
        """Jobs with equal keys can be concatenated and run together."""
        return self.names, self.images.shape[1:], self.images.dtype.str


class ModelQueue:
    """The waiting jobs of one model, taken by its sessions' threads."""

    def __init__(self, name: str, pool: SessionPool, max_batch_size: int) -> None:
        self.name = name
        self.pool = pool
        self.max_batch_size = max_batch_size
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Jobs queued, not yet taken by a session."""
        with self._cond:
            return len(self._jobs)

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:  # no session thread left to take it
                job.error = "the inference process is stopping"
                job.done.set()
                return
            self._jobs.append(job)
            self._cond.notify()

    def take(self) -> list[Job] | None:
        """The oldest job and every later one that fits in the same run; None once closed."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._jobs.popleft()
            taken, rest, n = [first], deque[Job](), len(first.images)
            for job in self._jobs:
                if job.key == first.key and n + len(job.images) <= self.max_batch_size:
                    taken.append(job)
                    n += len(job.images)
                else:
                    rest.append(job)
            self._jobs = rest
            return taken

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def serve(self, worker: Worker) -> None:
        """A session's thread: run what the queue hands out until it closes."""
        while (jobs := self.take()) is not None:
            self._run(worker, jobs)

    def _run(self, worker: Worker, jobs: list[Job]) -> None:
        try:
            parts = [j.images for j in jobs]
            n = sum(len(p) for p in parts)
            # The batch sizes the sessions were warmed up with: on CUDA, a new shape costs a
            # cuDNN search, so two workers' batches of 4 and 2 run as one of 8, not 6.
            size = next((b for b in self.pool.buckets if b >= n), n)
            if size > n:
                parts.append(np.zeros((size - n, *parts[0].shape[1:]), parts[0].dtype))
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
            # As the batcher's: other jobs waiting (a racy glance is enough), or several.
            outputs = worker.run(batch, jobs[0].names, n > 1 or bool(self._jobs))
        except Exception as exc:
            log.exception("inference failed on a batch of %d job(s) for %s", len(jobs), self.name)
            for j in jobs:
                j.error = f"{type(exc).__name__}: {exc}"
                j.done.set()
            try:
                # As a single process's batcher does: a failure may leave the session broken.
                worker.recreate()
            except Exception:
                log.exception("%s: session could not be recreated", worker.name)
            return
        start = 0
        for j in jobs:
            j.outputs = [o[start : start + len(j.images)] for o in outputs]
            start += len(j.images)
            j.done.set()


class InferenceHost:
    """Every served model's sessions and queue, and the socket the workers reach them on."""

    def __init__(self, queues: dict[str, ModelQueue]) -> None:
        self.queues = queues
        self._listener: Listener | None = None
        self._stopping = threading.Event()
        self._conns: set[Connection] = set()  # open ones, closed under the lock
        self._conns_lock = threading.Lock()
        self._served = threading.Event()  # serve() has returned
        for queue in queues.values():
            for w in queue.pool.workers:
                assert isinstance(w, Worker)
                w.executor.submit(queue.serve, w)

    @classmethod
    def load(cls, settings: Settings) -> InferenceHost:
        """The sessions of the repository's models, as one process would create them (all
        the cores, tuned settings applied), not split among the workers."""
        queues = {}
        for spec in discover(settings.repository, settings.models or None):
            tuned = tuning.apply(tuning.find(spec, settings)[0], settings)
            pool = SessionPool.load(spec, tuned)
            queues[spec.name] = ModelQueue(spec.name, pool, pool.buckets[-1])
        return cls(queues)

    def describe(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, queue in self.queues.items():
            first = queue.pool.workers[0]
            assert isinstance(first, Worker)
            out[name] = {
                "sessions": len(queue.pool.workers),
                "device": str(first.device),
                "provider": first.session.get_providers()[0],
            }
        return out

    def _answer(
        self, header: dict[str, Any], arrays: list[np.ndarray]
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        op = header.get("op")
        if op == "models":
            return {"models": self.describe()}, []
        if op != "run":
            return {"error": f"unknown operation {op!r}"}, []
        queue = self.queues.get(header.get("model", ""))
        if queue is None:
            return {"error": f"model {header.get('model')!r} is not served here"}, []
        if len(arrays) != 1 or arrays[0].ndim < 1:
            return {"error": "a run takes one batch array"}, []
        job = Job(arrays[0], tuple(header.get("names", ())))
        queue.put(job)
        job.done.wait()
        return ({"error": job.error}, []) if job.error is not None else ({}, job.outputs)

    def _handle(self, conn: Connection) -> None:
        """One connection's requests, one at a time, until the worker closes it."""
        try:
            while True:
                try:
                    header, arrays = recv_message(conn)
                except (EOFError, OSError):
                    return
                except (ValueError, TypeError, KeyError) as exc:
                    # Not our protocol: nothing more on this connection can be trusted.
                    log.error("malformed request: %s", exc)
                    return
                answer, outputs = self._answer(header, arrays)
                try:
                    send_message(conn, answer, outputs)
                except OSError:
                    return
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
                conn.close()

    def serve(self, path: str) -> None:
        """Accept the workers' connections on ``path`` until ``stop()`` (blocking)."""
        self._listener = Listener(path, family="AF_UNIX", backlog=256)
        log.info("inference process: %s served on %s", ", ".join(self.queues), path)
        try:
            self._accept()
        finally:
            self._served.set()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            if self._stopping.is_set():
                conn.close()
                break
            with self._conns_lock:
                self._conns.add(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self._listener.close()
        # The workers see what they would if this process ended: their connections close.
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as s:
                    s.shutdown(socket.SHUT_RDWR)  # wakes its handler's read; a close would not

    def stop(self, path: str) -> None:
        """End ``serve`` (a connection wakes its blocked accept) and the session threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            Client(path, family="AF_UNIX").close()
        if self._listener is not None:
            # Until the socket is gone, a connection would still succeed (into the backlog).
            self._served.wait(10)
        for queue in self.queues.values():
            queue.close()
            queue.pool.close()


def _exit(sig: int, frame: FrameType | None) -> None:
    """The supervisor stops this process once the workers drained: nothing is left to
    answer. Exit at once: a run in progress is inside onnxruntime, whose thread pools the
    interpreter's teardown would destroy under it."""
    logging.shutdown()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    from resnet_serve.service.cli import settings_from_args

    settings = settings_from_args(argv)
    logs.configure(settings.log_level, settings.log_format)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit)
    path = socket_path()
    if path is None:
        print("resnet-serve: the inference process needs its socket path", file=sys.stderr)
        return 2
    try:
        host = InferenceHost.load(settings)
    except Exception as exc:  # as the workers would say it, who find the same repository
        print(f"resnet-serve: inference process: cannot load models: {exc}", file=sys.stderr)
        return 2
    host.serve(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
