"""What every Tandem gRPC server has: health (grpc.health.v1), reflection, error mapping, and a
graceful drain (`GrpcServer.drain`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from engine.advertise import host_port
from engine.errors import TandemError, error_for_status

logger = logging.getLogger("engine.grpc")

MAX_MESSAGE_BYTES = 16 * 2**20
# Seconds a client is told to wait before retrying RESOURCE_EXHAUSTED (a full queue drains in
# about that): trailing metadata `retry-after` over gRPC, the `Retry-After` header over HTTP.
RETRY_AFTER_S = 1
SHUTTING_DOWN = "the server is shutting down"
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.so_reuseport", 0)]


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, TandemError):
        return grpc.StatusCode[exc.status], str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):  # a downstream call failed: keep its code
        return exc.code(), exc.details() or exc.code().name
    logger.exception("unexpected error in a gRPC handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def error_from_rpc(exc: grpc.aio.AioRpcError, peer: str) -> TandemError:
    """A failed call to another instance as a domain error keeping its status code."""
    return error_for_status(exc.code().name, f"{peer}: {exc.code().name}: {exc.details()}")


# Codes that blame the caller. On an internal call (decode -> prefill -> KV receiver) the caller is
# Tandem itself, so a user must not see them as a 4xx: they mean the tiers disagree.
_CALLER_FAULT_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN})


def internal_error_from_rpc(exc: grpc.aio.AioRpcError, peer: str) -> TandemError:
    """A failed call on an internal path, as the user should see it: codes that would blame the
    user become INTERNAL (HTTP 500, which alerts); UNAVAILABLE, DEADLINE_EXCEEDED,
    RESOURCE_EXHAUSTED and CANCELLED keep their meaning (503/504: retrying may help). The
    original code and details stay in the message."""
    error = error_from_rpc(exc, peer)
    if exc.code() in _CALLER_FAULT_CODES:
        error = error_for_status("INTERNAL", f"internal error: {error}")
    return error


def map_errors(method: Callable) -> Callable:
    """Decorates an async servicer method (unary or server-streaming): domain errors become
    their status codes; unexpected ones INTERNAL (and are logged)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext):
            try:
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                await _abort(context, exc)
        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await _abort(context, exc)
    return unary


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with exc's status; RESOURCE_EXHAUSTED carries `retry-after` (seconds)."""
    code, details = _status_for(exc)
    metadata = (("retry-after", str(RETRY_AFTER_S)),) \
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED else ()
    await context.abort(code, details, trailing_metadata=metadata)


async def stop_serving_when(event: asyncio.Event, servers: Iterable["GrpcServer"]) -> None:
    """Waits for `event` (an engine failed), then marks every server NOT_SERVING so health
    checks, the gateway's routing and Kubernetes probes stop sending traffic at once."""
    await event.wait()
    for server in servers:
        await server.set_serving(False)


class _DrainGate(grpc.aio.ServerInterceptor):
    """Counts the calls in flight to `methods` (full names, "/pkg.Service/Method"), and once
    `closed` refuses new ones with UNAVAILABLE. Other methods (health, reflection, Instance)
    pass untouched, so probes and the gateway still see the instance while it drains."""

    def __init__(self, methods: Iterable[str]) -> None:
        self.methods = frozenset(methods)
        self.closed = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method not in self.methods:
            return handler
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(handler.unary_stream))
        return handler._replace(unary_unary=self._unary(handler.unary_unary))

    def _enter(self) -> bool:
        """Counts a new call in; False (not counted) once closed."""
        if self.closed:
            return False
        self.inflight += 1
        self.idle.clear()
        return True

    def _exit(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()

    def _unary(self, behavior: Callable) -> Callable:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not self._enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            try:
                return await behavior(request, context)
            finally:
                self._exit()
        return unary

    def _stream(self, behavior: Callable) -> Callable:
        async def stream(request: Any, context: grpc.aio.ServicerContext):
            if not self._enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            try:
                # aclosing: a call that ends early closes the servicer's generator at once
                async with contextlib.aclosing(behavior(request, context)) as items:
                    async for item in items:
                        yield item
            finally:
                self._exit()
        return stream


REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def _reflection_v1(service_names: list[str]) -> grpc.GenericRpcHandler:
    """grpc.reflection.v1 beside v1alpha (grpcio-reflection serves only v1alpha; newer grpcurl
    and other clients ask v1 first). The two versions' messages are identical on the wire (same
    fields, same numbers; only the package differs), so v1alpha's servicer answers v1 calls
    through v1alpha's message classes. v1 is not in the list of services it reports, whose
    descriptors it could not give."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    return grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)})


class GrpcServer:
    """A grpc.aio server with health and reflection. Services are registered before start().
    `drained_methods`: the calls `drain` refuses and waits for (the request-carrying ones)."""

    def __init__(self, host: str, port: int, drained_methods: Iterable[str] = ()):
        self._gate = _DrainGate(drained_methods)
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[self._gate])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = host_port(host or "::", port)  # a bare IPv6 host such as :: gets brackets
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind gRPC server to {address}")
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]

    def add(self, add_fn: Callable, servicer: Any, service_names: Iterable[str]) -> None:
        add_fn(servicer, self.server)
        self._service_names += list(service_names)

    async def start(self) -> None:
        names = [*self._service_names, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.server.add_generic_rpc_handlers((_reflection_v1(names),))
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self._service_names]:
            result = self.health.set(name, status)
            if inspect.isawaitable(result):
                await result

    @property
    def inflight(self) -> int:
        """Calls to the drained methods in progress."""
        return self._gate.inflight

    async def refuse_new(self) -> None:
        """Marks the server NOT_SERVING and refuses new calls to the drained methods with
        UNAVAILABLE; calls in flight go on."""
        self._gate.closed = True
        await self.set_serving(False)

    async def drain(self, grace_s: float) -> int:
        """`refuse_new`, then waits up to grace_s for the calls in flight to end, logging both.
        Returns how many are still running (`stop` then cancels them)."""
        logger.info("draining %d in-flight requests (grace %.0f s)", self.inflight, grace_s)
        await self.refuse_new()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._gate.idle.wait(), grace_s)
        if self._gate.inflight:
            logger.warning("grace period over: aborting %d requests", self._gate.inflight)
        return self._gate.inflight

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)
