"""The KServe V2 / Triton ``GRPCInferenceService`` on ``--grpc-port``: grpcio's asyncio
server in the process and event loop of the HTTP server, over the same core.

Each RPC is parse (``service.grpc_codec``) -> core (``Engine.infer``) -> encode, with what
HTTP requests get: the same limits (``--max-body-bytes`` is the largest message), API
keys (``authorization: Bearer <key>`` metadata; liveness and readiness stay open, as
over HTTP), the deadline (the gRPC deadline, or the server's shorter limit), the client
cancelling, metrics (``endpoint`` label ``grpc_*``) and errors from the one table
(``service.errors``: its gRPC status code). On SIGTERM it stops taking RPCs and lets
those in flight finish, up to ``--drain-timeout-s``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as rpc

from resnet_serve.contract.schema import ModelSpec
from resnet_serve.service import logs, workers
from resnet_serve.service.auth import key_matches
from resnet_serve.service.engine import Engine, Job
from resnet_serve.service.errors import CLIENT_ERRORS, UnauthorizedError, answer, message
from resnet_serve.service.grpc_codec import infer_response, job, metadata_response, parse_request
from resnet_serve.service.metrics import GRPC_ENDPOINTS, status_class
from resnet_serve.service.reading import Reading
from resnet_serve.service.runtime import Runtime
from resnet_serve.service.triton_ext import config_of, index_of, statistics_of
from resnet_serve.service.v2_encode import EXTENSIONS
from resnet_serve.service.v2_names import V2Model, base_name, every_model, resolve

log = logging.getLogger(__name__)
OPEN = frozenset({"ServerLive", "ServerReady"})
INFER, MODEL, SERVER, HEALTH = GRPC_ENDPOINTS
APP_VERSION = "0.1.0"


def _unimplemented(what: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported")

    return method


def _rpc(endpoint: str) -> Callable[..., Any]:
    """Keys, errors (the table's gRPC code and message), metrics and access log."""

    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            model = getattr(request, "name", "") or getattr(request, "model_name", "")
            status = 200
            token = logs.request_id.set(getattr(request, "id", "") or "")
            self.metrics.requests_in_flight += 1
            try:
                if name not in OPEN:
                    self.authorize(context)
                return await method(self, request, context)
            except CLIENT_ERRORS as exc:
                row = answer(exc)
                status = row.v2_http
                await context.abort(getattr(grpc.StatusCode, row.grpc), message(exc))
            except asyncio.CancelledError:
                status = 499  # the client cancelled, or the drain ended
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                status = 500
                log.exception("unhandled error in gRPC %s", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                self.metrics.requests_in_flight -= 1
                known = base_name(model, self.runtime.models)
                known = known if known in self.runtime.models else ""
                self.metrics.requests_of(endpoint, known, str(status)).inc()
                if endpoint == INFER:
                    duration = time.perf_counter() - start
                    self.metrics.request_duration_of(endpoint, known, status_class(status)).observe(
                        duration
                    )
                logs.request_id.reset(token)

        return handler

    return wrap


class Servicer(rpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.engine: Engine = runtime.engine
        self.metrics = runtime.metrics
        self.keys = [k.encode() for k in runtime.settings.api_keys]

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.keys:
            return
        presented = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                if scheme.lower() == "bearer":
                    presented = token.strip().encode()
                break
        if not (presented and key_matches(presented, self.keys)):
            raise UnauthorizedError()

    def model(self, name: str, version: str = "") -> V2Model:
        return resolve(self.engine, name, version)

    @_rpc(HEALTH)
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    @_rpc(HEALTH)
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    @_rpc(MODEL)
    async def ModelReady(self, request: Any, context: Any) -> Any:
        served = self.model(request.name, request.version).served
        return pb.ModelReadyResponse(ready=served.serving and not self.runtime.draining)

    @_rpc(SERVER)
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name="resnet-serve", version=APP_VERSION, extensions=list(EXTENSIONS)
        )

    @_rpc(MODEL)
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        v2model = self.model(request.name, request.version)
        return metadata_response(v2model.spec, v2model.encoded)

    @_rpc(INFER)
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        v2model = self.model(request.model_name, request.model_version)
        remaining = context.time_remaining()
        client_ms = remaining * 1000.0 if remaining is not None else None
        deadline = self.engine.deadline(time.perf_counter(), client_ms)
        max_images = self.engine.settings.max_images_per_request

        async def parse(spec: ModelSpec, reading: Reading) -> Job:
            # Already received whole (grpc bounds one message): counted while it is held.
            reading.take(sum(len(raw) for raw in request.raw_input_contents))
            return job(parse_request(request, spec, max_images, v2model.encoded))

        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()

        def done(_: object) -> None:
            if not gone.done():
                gone.set_result(None)

        context.add_done_callback(done)
        result = await self.engine.infer(
            v2model.served, parse, endpoint=INFER, deadline=deadline, gone=lambda: gone
        )
        return infer_response(v2model.spec, result.job.request, result.outputs, v2model.name)

    # Triton's extensions, the documents /v2/models/{m}/config, /stats and
    # /v2/repository/index answer over HTTP, as the protocol's messages.
    @_rpc(MODEL)
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        doc = config_of(self.runtime, self.model(request.name, request.version))
        return json_format.ParseDict({"config": doc}, pb.ModelConfigResponse())

    @_rpc(MODEL)
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        # No name: every served model, as Triton answers.
        models = (
            [self.model(request.name, request.version)]
            if request.name
            else every_model(self.runtime.models)
        )
        doc = statistics_of(self.runtime, models)
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse())

    @_rpc(SERVER)
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        doc = {"models": index_of(self.runtime, request.ready)}
        return json_format.ParseDict(doc, pb.RepositoryIndexResponse())

    ModelStreamInfer = _unimplemented("ModelStreamInfer")


class _Handlers:
    """The generated servicer's method handlers, taken as they are registered, each parsing
    its own request: a malformed message is INVALID_ARGUMENT, not grpcio's UNKNOWN with a
    logged traceback (its deserializer runs outside every handler). A method the service
    does not implement answers UNIMPLEMENTED without the generated stub's traceback."""

    SERVICE = "inference.GRPCInferenceService"

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers as below, built by ``generic``

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers.update(handlers)

    def generic(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            self.SERVICE, {name: self._lenient(name, h) for name, h in self.handlers.items()}
        )

    @staticmethod
    def _lenient(name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behaviour, parse = handler.unary_unary, handler.request_deserializer
        if behaviour is None or parse is None:  # ModelStreamInfer: unimplemented anyway
            return handler
        servicer = behaviour.__self__  # type: ignore[attr-defined]
        if getattr(type(servicer), name) is getattr(rpc.GRPCInferenceServiceServicer, name):
            behaviour = functools.partial(_unimplemented(name), servicer)

        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                request = parse(raw)
            except DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name}: {exc}")
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            call, response_serializer=handler.response_serializer
        )


class GrpcServer:
    """The gRPC front end's lifecycle, driven by the application's lifespan."""

    def __init__(self, runtime: Runtime) -> None:
        s = runtime.settings
        # The largest message is the largest HTTP body: the same request, either way.
        limit = s.max_body_bytes
        self.runtime = runtime
        self.drain_timeout_s = s.drain_timeout_s
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                # A port in use is an error, not a shared port; but --workers' processes
                # share it, as they share the HTTP port.
                ("grpc.so_reuseport", int(workers.worker_index() is not None)),
            ]
        )
        handlers = _Handlers()
        rpc.add_GRPCInferenceServiceServicer_to_server(Servicer(runtime), handlers)
        self.server.add_generic_rpc_handlers((handlers.generic(),))
        host = f"[{s.host}]" if ":" in s.host else s.host
        try:
            self.port = self.server.add_insecure_port(f"{host}:{s.grpc_port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {s.host}:{s.grpc_port} ({exc})") from None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        log.info("gRPC listening on %s:%d", self.runtime.settings.host, self.port)
        self.runtime.on_drain(self.begin_stop)

    def begin_stop(self) -> None:
        """New RPCs are refused from now on; those in flight get the drain's time."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.server.stop(self.drain_timeout_s))

    async def stop(self) -> None:
        self.begin_stop()
        assert self._stopping is not None
        await self._stopping
