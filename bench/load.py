"""The load generator: closed-loop HTTP clients over keep-alive connections (by default
bench/rawhttp.py's lean client, or aiohttp's).

Each of ``concurrency`` clients sends a request, waits for the whole answer, and sends
the next one at once. A step first warms up unmeasured (connections opened, the server's
batches grown to the load), then measures every request that *completes* inside its
window. Only 200 answers count toward throughput and latency; every other
outcome is counted by status code (or by the client-side exception).

The request bodies are built once: on a 2-core machine the client shares the CPU with
the server, so anything it does per request is taken from the system it measures.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httptools
import numpy as np
import orjson

from resnet_serve.bench import rawhttp
from resnet_serve.bench.corpus import image_type

BOUNDARY = "resnet-bench-8f3c1a7e5b2d4c6f"
CLIENTS = ("raw", "aiohttp")
MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass(frozen=True)
class Target:
    """One system under load: where to send, and what a correct answer holds."""

    system: str  # "service" | "naive": the row label in the report
    url: str  # the full endpoint URL, query included
    images_per_request: int
    # "classify" | "embed" | "v2" (a V2 answer whose BYTES output is a classify answer)
    endpoint: str = "classify"
    headers: tuple[tuple[str, str], ...] = ()
    # The service's Prometheus endpoint, read around each window for the batch sizes of
    # ``model`` (all models when None).
    metrics_url: str | None = None
    model: str | None = None


@dataclass
class StepResult:
    system: str
    concurrency: int
    images_per_request: int
    window_s: float
    ok: int
    errors: dict[str, int]
    latencies_ms: list[float] = field(repr=False)
    client_cpu_s: float
    server_cpu_s: float | None = None
    # Differences of the service's batch counters over the window (see BATCH_METRICS).
    batches: dict[str, float] | None = None
    round: int = 1  # of --rounds: the systems' sweeps interleaved, round after round

    @property
    def mean_batch(self) -> float | None:
        if not self.batches or not self.batches.get("batches"):
            return None
        return self.batches["images"] / self.batches["batches"]

    @property
    def req_s(self) -> float:
        return self.ok / self.window_s if self.window_s > 0 else 0.0

    @property
    def img_s(self) -> float:
        return self.req_s * self.images_per_request

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "round": self.round,
            "images_per_request": self.images_per_request,
            "window_s": self.window_s,
            "ok": self.ok,
            "errors": self.errors,
            "req_s": self.req_s,
            "img_s": self.img_s,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "client_cpu_s": self.client_cpu_s,
            "server_cpu_s": self.server_cpu_s,
            "batches": self.batches,
            "mean_batch": self.mean_batch,
            "latencies_ms": [round(x, 3) for x in self.latencies_ms],
        }


def multipart_body(images: Sequence[bytes]) -> bytes:
    """``multipart/form-data`` with one ``file`` part per image (content type
    ``MULTIPART_TYPE``), as ``curl -F file=@a.jpg -F file=@b.jpg`` sends it."""
    sep = f"--{BOUNDARY}".encode()
    parts = []
    for i, data in enumerate(images):
        if sep in data:  # never seen in a JPEG; a silently corrupt body would skew everything
            raise ValueError(f"image {i} contains the multipart boundary")
        ext, mime = image_type(data)
        head = (
            f'Content-Disposition: form-data; name="file"; filename="{i}.{ext}"\r\n'
            f"Content-Type: {mime}\r\n\r\n"
        )
        parts.append(sep + b"\r\n" + head.encode() + data + b"\r\n")
    return b"".join(parts) + sep + b"--\r\n"


def request_bodies(corpus: Sequence[bytes], images_per_request: int) -> list[bytes]:
    """Bodies that between them send the corpus in order, ``images_per_request`` images
    each (the remainder of the division left out)."""
    n = len(corpus)
    count = max(1, n // images_per_request)
    return [
        multipart_body(
            [corpus[(j * images_per_request + i) % n] for i in range(images_per_request)]
        )
        for j in range(count)
    ]


def v2_bytes_bodies(
    corpus: Sequence[bytes], input_name: str, output_name: str
) -> tuple[list[bytes], list[tuple[str, str]]]:
    """KServe V2 requests with the binary tensor extension, one image each: the encoded
    image as a ``[1, 1]`` BYTES input ``input_name``, ``output_name`` asked for as JSON.
    Each JSON header is padded with spaces to the longest one's length, so that every
    request carries the same ``Inference-Header-Content-Length`` (the lean client sends one
    set of headers) and the headers to send with them."""
    heads = [
        orjson.dumps({
            "inputs": [{
                "name": input_name, "shape": [1, 1], "datatype": "BYTES",
                "parameters": {"binary_data_size": 4 + len(data)},
            }],
            "outputs": [{"name": output_name, "parameters": {"binary_data": False}}],
        })
        for data in corpus
    ]  # fmt: skip
    width = max(len(h) for h in heads)
    bodies = [
        h.ljust(width) + len(data).to_bytes(4, "little") + data
        for h, data in zip(heads, corpus, strict=True)
    ]
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Inference-Header-Content-Length", str(width)),
    ]
    return bodies, headers


def check_answer(body: bytes, target: Target) -> str | None:
    """Why a 200 answer is not a correct one, or None."""
    try:
        doc = orjson.loads(body)
        if target.endpoint == "v2":
            # A V2 answer whose one BYTES output is the service's /classify answer as text.
            (output,) = doc["outputs"]
            doc = {"results": [orjson.loads(a)["results"][0] for a in output["data"]]}
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return "invalid JSON"
    key = "embeddings" if target.endpoint == "embed" else "results"
    items = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) != target.images_per_request:
        return f"expected {target.images_per_request} {key}"
    return None


def children(pid: int) -> list[int]:
    # Every thread's children: a process started from another thread than the main one (a
    # JVM's or Ray's raylet's workers) is listed under that thread only.
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found += [int(p) for p in f.read().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return found


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its live descendants so far (Linux: the
    workers of ``resnet-serve --workers`` are children of the process started), or None
    where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the ")" of the name.
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(process_cpu_s(c) or 0.0 for c in children(pid))


BATCH_METRICS = {
    "batches": "resnet_serve_batch_size_count",
    "images": "resnet_serve_batch_size_sum",
    "padding": "resnet_serve_batch_padding_images_total",
    "inference_s": "resnet_serve_inference_duration_seconds_sum",
}


def parse_metrics(text: str, model: str | None = None) -> dict[str, float]:
    """The BATCH_METRICS from Prometheus text, summed over the label sets of ``model``
    (of every model when None)."""
    wanted = {v: k for k, v in BATCH_METRICS.items()}
    label = f'model="{model}"' if model is not None else ""
    out = dict.fromkeys(BATCH_METRICS, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted and label in line:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


async def _scrape(session: aiohttp.ClientSession, target: Target) -> dict[str, float] | None:
    if target.metrics_url is None:
        return None
    try:
        async with session.get(target.metrics_url) as resp:
            if resp.status != 200:
                return None
            return parse_metrics(await resp.text(), target.model)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None  # the figures are a diagnosis; the step is valid without them


# Called about four times a second: (seconds measured so far, None while warming up;
# measured OK answers; measured errors).
Tick = Callable[[float | None, int, int], None]


class _StepState:
    """What the clients of one step share (one event loop: no locks)."""

    def __init__(self, concurrency: int, requests: int | None) -> None:
        self.concurrency = concurrency
        self.requests = requests
        self.measuring = False
        self.stopping = False
        self.checked = False
        self.warm_answers = 0
        self.warmed = asyncio.Event()
        self.enough = asyncio.Event()
        self.window_end = 0.0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()

    def record(self, outcome: str | None, start: float, end: float) -> None:
        if self.stopping:
            return  # finished after the window: neither counted nor timed
        if not self.measuring:
            self.warm_answers += 1
            if self.warm_answers >= self.concurrency:
                self.warmed.set()
            return
        if outcome is None:
            self.latencies.append((end - start) * 1000.0)
        else:
            self.errors[outcome] += 1
        if self.requests is not None and len(self.latencies) + self.errors.total() >= self.requests:
            self.window_end = end
            self.stopping = True
            self.enough.set()


async def run_step(
    target: Target,
    bodies: Sequence[bytes],
    concurrency: int,
    *,
    warmup_s: float,
    duration_s: float | None,
    requests: int | None,
    timeout_s: float,
    server_pid: int | None = None,
    tick: Tick | None = None,
    client: str = "raw",
) -> StepResult:
    """One step at ``concurrency``: warmup (``warmup_s`` and until every client has had
    an answer, so that the server has seen the full load), then ``duration_s`` seconds or
    ``requests`` measured completions. ``client``: one of CLIENTS."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {', '.join(CLIENTS)}")
    headers = {"Content-Type": MULTIPART_TYPE, **dict(target.headers)}
    cycle = itertools.cycle(bodies)
    st = _StepState(concurrency, requests)

    def judge(status: int, payload: bytes) -> str | None:
        if status != 200:
            return str(status)
        if st.measuring and not st.checked:
            # One parsed answer per step proves the endpoint does the work asked for;
            # parsing every one would load the client.
            st.checked = True
            if check_answer(payload, target) is not None:
                return "invalid-answer"
        return None

    async def aiohttp_client(session: aiohttp.ClientSession) -> None:
        while not st.stopping:
            body = next(cycle)
            start = time.perf_counter()
            outcome: str | None = None
            try:
                async with session.post(target.url, data=body, headers=headers) as resp:
                    outcome = judge(resp.status, await resp.read())
            except asyncio.TimeoutError:
                outcome = "timeout"
            except aiohttp.ClientError as exc:
                outcome = type(exc).__name__
            st.record(outcome, start, time.perf_counter())

    host, port, prepared = (
        rawhttp.prepare(target.url, bodies, list(headers.items()))
        if client == "raw"
        else ("", 0, [])
    )
    raw_cycle = itertools.cycle(prepared)

    async def raw_client() -> None:
        conn: rawhttp.Connection | None = None
        try:
            while not st.stopping:
                request = next(raw_cycle)
                start = time.perf_counter()
                outcome: str | None = None
                try:
                    if conn is None or conn.closed:
                        conn = None  # a failed connect must not leave the old one to reuse
                        conn = await rawhttp.Connection.open(host, port)
                    outcome = judge(*await conn.exchange(request, timeout_s))
                except TimeoutError:
                    outcome = "timeout"
                except (OSError, httptools.HttpParserError) as exc:
                    outcome = type(exc).__name__
                    # Some failures come without an await (a connection found closed): the
                    # loop must still run the step's timers and the other clients.
                    await asyncio.sleep(0)
                st.record(outcome, start, time.perf_counter())
        finally:
            if conn is not None:
                conn.close()

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    window_start = time.perf_counter()  # set again when the window opens
    # The scrapes get their own connection: the clients' pool is full by design.
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(timeout=timeout) as scraper,
    ):
        tasks = [
            asyncio.create_task(raw_client() if client == "raw" else aiohttp_client(session))
            for _ in range(concurrency)
        ]

        async def ticker() -> None:
            while tick is not None:
                measured = time.perf_counter() - window_start if st.measuring else None
                tick(measured, len(st.latencies), st.errors.total())
                await asyncio.sleep(0.25)

        ticking = asyncio.create_task(ticker())
        try:
            await _sleep_or_fail(warmup_s, tasks)
            await _wait_or_fail(st.warmed, tasks)
            metrics0 = await _scrape(scraper, target)
            st.measuring = True
            cpu0, srv0 = time.process_time(), _cpu(server_pid)
            window_start = time.perf_counter()
            if duration_s is not None:
                await _sleep_or_fail(duration_s, tasks)
                st.window_end = time.perf_counter()
                st.stopping = True
            else:
                await _wait_or_fail(st.enough, tasks)
            cpu1, srv1 = time.process_time(), _cpu(server_pid)
            metrics1 = await _scrape(scraper, target)
            # In-flight requests finish (uncounted) so the next step starts from idle.
            await asyncio.gather(*tasks)
        finally:
            ticking.cancel()
            for t in tasks:
                t.cancel()
    server_cpu = srv1 - srv0 if srv0 is not None and srv1 is not None else None
    batches = (
        {k: metrics1[k] - metrics0[k] for k in BATCH_METRICS}
        if metrics0 is not None and metrics1 is not None
        else None
    )
    return StepResult(
        system=target.system,
        concurrency=concurrency,
        images_per_request=target.images_per_request,
        window_s=st.window_end - window_start,
        ok=len(st.latencies),
        errors=dict(sorted(st.errors.items())),
        latencies_ms=st.latencies,
        client_cpu_s=cpu1 - cpu0,
        server_cpu_s=server_cpu,
        batches=batches,
    )


def _cpu(pid: int | None) -> float | None:
    return process_cpu_s(pid) if pid is not None else None


async def _sleep_or_fail(seconds: float, tasks: list[asyncio.Task[None]]) -> None:
    """Sleep, but surface at once a client that died of an unexpected exception."""
    await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    _raise_failed(tasks)


async def _wait_or_fail(event: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    _raise_failed(tasks)


def _raise_failed(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
