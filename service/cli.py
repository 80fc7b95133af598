"""``resnet-serve``: options from the command line or ``RESNET_SERVE_*``, then uvicorn."""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import signal
import socket
import sys
import time
from importlib.util import find_spec
from types import FrameType
from typing import NoReturn

import uvicorn
from pydantic import ValidationError

from resnet_serve.service import logs, workers
from resnet_serve.service.app import create_app
from resnet_serve.service.connections import ConnectionLimits, guarded_protocol
from resnet_serve.service.descriptors import connection_limit, raise_fd_limit
from resnet_serve.service.metric_values import clear_files
from resnet_serve.service.metrics import Metrics
from resnet_serve.service.repository import RepositoryError
from resnet_serve.service.runtime import Runtime
from resnet_serve.service.settings import Settings, options

# Exit codes (the README lists them): 0 after a drain, EXIT_USAGE for an invalid option,
# repository or model, EXIT_LISTEN when the address cannot be bound.
EXIT_USAGE = 2
EXIT_LISTEN = 3
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resnet-serve",
        description="Serve the models of an ONNX model repository (made by resnet-export) over "
        "HTTP. Every option can also be set as RESNET_SERVE_<OPTION> in the environment.",
    )
    for o in options():
        # argparse expands "%" in help texts.
        help_text = f"{o.description} [env {o.env}; default: {o.default}]".replace("%", "%%")
        if o.boolean:
            p.add_argument(
                o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
        else:
            p.add_argument(o.flag, dest=o.name, default=None, help=help_text)
    return p


def settings_from_args(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**given)


class DrainingServer(uvicorn.Server):
    """Readiness turns 503 the moment SIGTERM/SIGINT arrives; uvicorn then stops
    accepting, lets in-flight requests finish (``timeout_graceful_shutdown``) and runs
    the lifespan shutdown, which drains the batchers and stops a warmup in progress.
    A second Ctrl-C quits at once, without waiting for what was accepted."""

    runtime: Runtime | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # uvicorn says where it listens only for addresses it bound itself.
        for sock in sockets or ():
            host, port = sock.getsockname()[:2]
            url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            log.info("listening on %s (Ctrl-C to stop)", url)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            # uvicorn's own "force quit" would skip the lifespan shutdown, and the lifespan
            # task, cancelled on the way out, would log a traceback.
            _end_process(0)
        if self.runtime is not None:
            self.runtime.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, so the process would die "by
        # SIGTERM", or with a KeyboardInterrupt traceback for Ctrl-C; a completed drain is
        # a clean exit (0) for orchestrators and people alike.
        self._captured_signals = [
            s for s in self._captured_signals if s not in (signal.SIGINT, signal.SIGTERM)
        ]


def freeze_heap() -> None:
    """What exists once the models are warm (modules, sessions, routes, schemas: ~80k
    objects) lives as long as the process. Frozen, the collector no longer walks it in the
    full collections that request handling's allocations keep triggering: with the tiny
    model, a quarter of the event loop thread's profile samples (docs/benchmarks.md, "where
    a request's CPU goes"). One collection first (40-55 ms, logged), so that no startup
    garbage is frozen."""
    t = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug(
        "heap frozen: %d objects, after a collection of %.1f ms",
        gc.get_freeze_count(), 1000 * (time.perf_counter() - t),
    )  # fmt: skip


def _end_process(code: int) -> NoReturn:
    """Exit now, skipping the interpreter's teardown. A warmup cut short by a signal may
    still be inside one onnxruntime run on its own thread (a run cannot be interrupted),
    and the normal teardown would destroy onnxruntime's thread pools under it: the
    process would abort ("terminate called without an active exception")."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_now(sig: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM outside uvicorn's watch: while the models load, or once the drain is
    over. Nothing accepted is left to drain, so the process ends at once, quietly, with the
    drain's exit code."""
    _end_process(0)


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening address, bound before the models load: a port already in use fails
    in a second with one line, not after the load with uvicorn's log record. The same
    socket as uvicorn's own (``Config.bind_socket``), handed to it. ``reuse_port``: one of
    the ``--workers``, sharing the port with the others (service/workers.py)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def exclusive(host: str, port: int) -> int:
    """``port`` (or, for 0, the one the kernel picks), checked to be free by binding it
    alone: another server's ``--workers`` share theirs with SO_REUSEPORT, which would take
    a shared bind in, halving each one's traffic without a word. OSError when taken."""
    with bind(host, port) as probe:
        return int(probe.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"resnet-serve: invalid option: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_level, settings.log_format)
    workers.tag_logs()
    # Before anything slow: Ctrl-C while the models load is not a KeyboardInterrupt
    # traceback. uvicorn puts its own handlers in place while it serves and restores these
    # after, so asyncio's runner never installs its SIGINT handler (which would turn a
    # late Ctrl-C into a KeyboardInterrupt traceback).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_now)
    is_worker = workers.worker_index() is not None
    if not is_worker:
        settings = workers.tuned_layout(settings)
    port, option = settings.port, "--port"
    try:
        if settings.workers > 1 and not is_worker:
            reserved = bind(settings.host, exclusive(settings.host, settings.port), True)
            # Its workers share it as they share the HTTP port (where gRPC will serve).
            grpc_on = find_spec("grpc") is not None or "grpc_port" in settings.model_fields_set
            if settings.grpc_port and grpc_on:
                port, option = settings.grpc_port, "--grpc-port"
                exclusive(settings.host, settings.grpc_port)
        else:
            sock = bind(settings.host, settings.port, reuse_port=is_worker)
    except OSError as exc:
        hint = (
            f": another process is using it; stop that one or choose another {option}"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        print(
            f"resnet-serve: cannot listen on {settings.host}:{port} ({exc.strerror or exc}){hint}",
            file=sys.stderr,
        )
        return EXIT_LISTEN
    if settings.workers > 1 and not is_worker:
        return workers.Supervisor(settings, sys.argv[1:] if argv is None else argv).run(reserved)
    if not is_worker and os.environ.get(workers.MULTIPROC_ENV):  # one process, a given dir
        clear_files(os.environ[workers.MULTIPROC_ENV])
    try:
        # Loaded before the server starts, so a bad repository fails fast with a message.
        runtime = Runtime.load(settings, Metrics())
    except RepositoryError as exc:
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # onnxruntime refusing a model file, typically
        print(f"resnet-serve: cannot load models: {exc}", file=sys.stderr)
        return EXIT_USAGE
    runtime.before_ready = freeze_heap
    app = create_app(settings, runtime)
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        body_idle_timeout_s=settings.body_idle_timeout_s,
        max_connections=connection_limit(settings.max_connections, raise_fd_limit()),
    )
    config = uvicorn.Config(
        app,
        http=guarded_protocol(limits, runtime.metrics),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # ours (service.access) carries request IDs and models
        # No "server: uvicorn" on every answer: it names what runs here to any client, and
        # each header of an answer is Python work in uvicorn's send.
        server_header=False,
        # Nothing here reads the client's address or scheme, which is all X-Forwarded-*
        # would change: one ASGI layer less around every request.
        proxy_headers=False,
        # No WebSocket route exists: an upgrade is answered as the HTTP request it also is,
        # not handed to a WebSocket protocol (which our connection accounting never saw end).
        ws="none",
        log_config=None,
        # 0: cancel at once; fractions as given (uvicorn passes it to asyncio.wait_for).
        timeout_graceful_shutdown=settings.drain_timeout_s,
        lifespan="on",
    )
    server = DrainingServer(config)
    server.runtime = runtime
    server.run(sockets=[sock])
    # Drained (or a second Ctrl-C forced the way out): nothing left to save.
    _end_process(0)


if __name__ == "__main__":
    raise SystemExit(main())
