"""``--shared-inference``: the workers' side of the inference process, and the wire
between them (service/inference_host.py is the other side).

A message is one JSON header frame followed by one frame per array, each frame
length-prefixed by ``multiprocessing.connection``. An array's frame is its raw bytes, read
straight into an array allocated from the header's dtype and shape: no copy beyond the
socket's, and the arrays are writable like onnxruntime's own. Each connection carries one
request at a time (its runner's one thread), so no request ids are needed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np

from resnet_serve.contract.schema import ModelSpec, RepositoryError
from resnet_serve.service.devices import Device, parse_devices
from resnet_serve.service.sessions import DEFAULT_OUTPUTS, SessionPool
from resnet_serve.service.settings import Settings
from resnet_serve.service.workers import INFERENCE_SOCKET_ENV

log = logging.getLogger(__name__)
# How long a worker waits for the inference process to listen: it binds its socket once
# every model is loaded, which for large models on CUDA takes minutes.
CONNECT_TIMEOUT_S = 600.0


class RemoteInferenceError(RuntimeError):
    """The inference process answered with an error, or could not be reached."""


def send_message(conn: Connection, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    conn.send_bytes(json.dumps(header).encode())
    for a in arrays:
        conn.send_bytes(memoryview(a).cast("B") if a.size else b"")


def recv_message(conn: Connection) -> tuple[dict[str, Any], list[np.ndarray]]:
    header = json.loads(conn.recv_bytes())
    arrays = []
    for dtype, shape in header.pop("arrays"):
        a = np.empty(shape, dtype=np.dtype(dtype))
        if a.size:
            conn.recv_bytes_into(memoryview(a).cast("B"))
        else:
            conn.recv_bytes()
        arrays.append(a)
    return header, arrays


def socket_path() -> str | None:
    """The inference process's socket, in a worker started with ``--shared-inference``."""
    return os.environ.get(INFERENCE_SOCKET_ENV) or None


def connect(path: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Connection:
    """A connection to the inference process, waiting for it to listen."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            return Client(path, family="AF_UNIX")
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= end:
                raise RemoteInferenceError(f"no inference process listening on {path}") from None
            time.sleep(0.05)


class RemoteRunner:
    """A ``Runner`` (service/sessions.py) whose session is in the inference process. Its
    one thread holds its one connection, so calls never interleave on the wire."""

    def __init__(self, path: str, model: str, device: Device, name: str, provider: str) -> None:
        self.path = path
        self.model = model
        self.device = device
        self.name = name
        self.provider = provider
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: Connection | None = connect(path)

    def _call(self, header: dict[str, Any], arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self._conn is None:
            raise RemoteInferenceError("not connected to the inference process")
        try:
            send_message(self._conn, header, arrays)
            answer, out = recv_message(self._conn)
        except (OSError, EOFError) as exc:
            # Half a message may be on the wire: this connection cannot be trusted again.
            self._conn.close()
            self._conn = None
            raise RemoteInferenceError(f"inference process unreachable: {exc!r}") from None
        if "error" in answer:
            raise RemoteInferenceError(answer["error"])
        return out

    def run(
        self, images: np.ndarray, names: tuple[str, ...] = DEFAULT_OUTPUTS, busy: bool = False
    ) -> list[np.ndarray]:
        # The inference process sees every worker's queue and decides busy for itself.
        return self._call({"op": "run", "model": self.model, "names": list(names)}, [images])

    def models(self) -> dict[str, dict[str, Any]]:
        """What the inference process serves: per model its sessions, device, provider."""
        if self._conn is None:
            raise RemoteInferenceError("not connected to the inference process")
        send_message(self._conn, {"op": "models"}, [])
        return recv_message(self._conn)[0]["models"]

    def recreate(self) -> None:
        """After a failed run: a fresh connection (the session itself, if its run failed,
        the inference process recreates). Fails fast when nobody listens any more, which
        retires this runner: the inference process is gone and the supervisor ends all."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._conn = connect(self.path, timeout_s=1.0)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def load_pool(spec: ModelSpec, settings: Settings, path: str) -> SessionPool:
    """A pool of one model whose runners use the inference process's sessions, one runner
    per session there: a worker has as many batches in flight as the sessions can run."""
    first = RemoteRunner(path, spec.name, parse_devices("cpu")[0], f"remote-{spec.name}-0", "")
    served = first.models()
    if spec.name not in served:
        first.close()
        raise RepositoryError(f"model {spec.name} is not served by the inference process")
    info = served[spec.name]
    first.device = parse_devices(info["device"])[0]
    first.provider = info["provider"]
    runners = [first] + [
        RemoteRunner(path, spec.name, first.device, f"remote-{spec.name}-{i}", first.provider)
        for i in range(1, info["sessions"])
    ]
    log.info(
        "%s: %d remote session(s) on %s in the inference process (%s)",
        spec.name, len(runners), first.device, path,
    )  # fmt: skip
    return SessionPool(list(runners), settings.buckets_for(first.device.kind))
