"""What every Tandem gRPC server has: health (grpc.health.v1), reflection, error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.advertise import host_port
from engine.errors import TandemError, error_for_status

logger = logging.getLogger("engine.grpc")

MAX_MESSAGE_BYTES = 16 * 2**20
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
                await context.abort(*_status_for(exc))
        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await context.abort(*_status_for(exc))
    return unary


async def stop_serving_when(event: asyncio.Event, servers: Iterable["GrpcServer"]) -> None:
    """Waits for `event` (an engine failed), then marks every server NOT_SERVING so health
    checks, the gateway's routing and Kubernetes probes stop sending traffic at once."""
    await event.wait()
    for server in servers:
        await server.set_serving(False)


class GrpcServer:
    """A grpc.aio server with health and reflection. Services are registered before start()."""

    def __init__(self, host: str, port: int):
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
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
        reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME],
                                            self.server)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self._service_names]:
            result = self.health.set(name, status)
            if inspect.isawaitable(result):
                await result

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)
