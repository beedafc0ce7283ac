"""The public `tandem.v1.Generation` gRPC service (grpc.aio, same event loop as the HTTP API),
plus grpc.health.v1 Health and server reflection.

Thin servicer: validate and convert with `gateway.convert`, call the Backend, forward the decode
stream. `_grpc_errors` is the one place exceptions become status codes: a ApiError keeps its
code and message; anything unexpected is INTERNAL (and logged).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import uuid
from typing import Any, AsyncIterator, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import convert
from gateway.backend import Backend
from gateway.errors import ApiError, invalid
from protos.tandem.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger("tandem.gateway")

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_SERVER_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Ends the call with exc's status (raises grpc.aio.AbortError, as context.abort does)."""
    if not isinstance(exc, ApiError):
        logger.exception("unexpected error in the Generation service")
        exc = ApiError(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")
    await context.abort(exc.grpc_code, exc.message)


def _grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Maps exceptions of a servicer method (coroutine or async generator) to status codes."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except Exception as e:  # noqa: BLE001 - the status-code boundary
                await _abort(context, e)
        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except Exception as e:  # noqa: BLE001 - the status-code boundary
            await _abort(context, e)
    return unary_wrapper


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """tandem.v1.Generation over a Backend."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def _prompt_ids(self, request: generation_pb2.GenerateRequest) -> list[int]:
        """Text (tokenized with the tokenizer's special tokens, no chat template) or ids."""
        kind = request.WhichOneof("prompt")
        if kind == "text":
            if not request.text:
                raise invalid("the prompt is empty", "text")
            if self._backend.tokenizer is None:
                raise ApiError(grpc.StatusCode.UNAVAILABLE, "the tokenizer is not loaded")
            ids = self._backend.tokenizer.encode(request.text)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            raise invalid("a prompt is required: set text or token_ids", "prompt")
        return convert.check_prompt_ids(ids, self._backend.model, kind or "prompt")

    @_grpc_errors
    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Streams the decode tier's responses with request_id filled in. The caller's
        deadline (if shorter than the gateway's) is passed on to the decode tier."""
        spec = self._backend.model
        convert.check_model(request.model, spec)
        ids = self._prompt_ids(request)
        sampling = convert.check_sampling_pb(request.sampling, len(ids), spec)
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        async with self._backend.start(request_id, ids, sampling,
                                       timeout_s=context.time_remaining()) as stream:
            async for resp in stream:
                resp.request_id = request_id
                yield resp

    @_grpc_errors
    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> generation_pb2.ModelInfo:
        return self._backend.model.to_pb()

    @_grpc_errors
    async def Abort(self, request: generation_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> generation_pb2.AbortResponse:
        """Cancels the in-flight Generate `request_id` (its stream ends with CANCELLED)."""
        return generation_pb2.AbortResponse(aborted=self._backend.abort(request.request_id))


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Reports the gateway (service "") and the Generation service as (NOT_)SERVING."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for service in ("", GENERATION_SERVICE):
        await health_servicer.set(service, status)


def build_grpc_server(backend: Backend, address: str
                      ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A grpc.aio server with Generation, Health and reflection, bound (not started) to
    `address`. Returns (server, health servicer, bound port). Call inside the running loop."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(backend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the gRPC API to {address}")
    return server, health_servicer, port
