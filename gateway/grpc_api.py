"""The public `tandem.v1.Generation` gRPC service (grpc.aio, same event loop as the HTTP API),
plus grpc.health.v1 Health and server reflection.

Thin servicer: validate and convert with `gateway.convert`, call the Backend, forward the decode
stream. `engine.grpc_server.map_errors` turns exceptions into status codes: an ApiError keeps its
code and message; anything unexpected is INTERNAL (and logged). With an API key every
Generation RPC first checks the call's `authorization: Bearer KEY` metadata (UNAUTHENTICATED
otherwise); Health and reflection stay open. While the gateway drains (`GrpcServer.drain`), a new
Generate gets UNAVAILABLE "the server is shutting down"; GetModelInfo and Abort still answer.
"""

from __future__ import annotations

import logging
import uuid
from typing import AsyncIterator

import grpc

from engine.grpc_server import GrpcServer, map_errors
from gateway import convert
from gateway.backend import Backend
from gateway.choices import Choices
from gateway.errors import ApiError, ApiKey, invalid
from protos.tandem.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger("tandem.gateway")

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
GENERATE_METHOD = f"/{GENERATION_SERVICE}/Generate"


# The tiers get the caller's deadline less this fraction of the time left (at most
# MAX_DEADLINE_MARGIN_S): the gateway sees it pass first and still has time to send the last
# message, with the usage so far, before the caller's own deadline ends the call.
DEADLINE_MARGIN_FRACTION = 0.1
MAX_DEADLINE_MARGIN_S = 0.5


def tier_timeout(remaining_s: float | None) -> float | None:
    """The deadline (seconds from now) the tiers get for a call with `remaining_s` left
    (None: no deadline of the caller's; the gateway's --request-timeout still applies)."""
    if remaining_s is None:
        return None
    return remaining_s - min(remaining_s * DEADLINE_MARGIN_FRACTION, MAX_DEADLINE_MARGIN_S)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """tandem.v1.Generation over a Backend; every RPC calls `_authenticate` first."""

    def __init__(self, backend: Backend, api_key: ApiKey | None = None) -> None:
        self._backend = backend
        self._api_key = api_key

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """Raises ApiError UNAUTHENTICATED unless there is no key or the call's metadata has
        `authorization: Bearer KEY`."""
        if self._api_key is not None:
            metadata = dict(context.invocation_metadata() or ())
            self._api_key.check(metadata.get("authorization"))

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

    @map_errors
    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Streams the decode tier's responses with request_id filled in (n > 1: the branches'
        interleaved, best_of > n: the chosen ones at the end, see gateway.choices). The
        caller's deadline (if shorter than the gateway's) is passed on to the decode tier, a
        little shorter (`tier_timeout`). A stream ended by Abort or a deadline gets, for each
        branch still open (none with best_of > n: the client saw no branch yet), a last message
        with finish_reason ABORT and its usage so far, then its status (CANCELLED,
        DEADLINE_EXCEEDED); a call its caller cancelled can receive nothing more."""
        self._authenticate(context)
        spec = self._backend.model
        convert.check_model(request.model, spec)
        ids = self._prompt_ids(request)
        n, best_of = convert.check_choices_pb(request.n, request.best_of)
        sampling = convert.check_sampling_pb(request.sampling, len(ids), spec)
        keep_logprobs = sampling.HasField("logprobs")
        if best_of > n and not keep_logprobs:
            sampling.logprobs = 0  # to rank the branches
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        stream = self._backend.start(request_id, ids, sampling,
                                     timeout_s=tier_timeout(context.time_remaining()), n=best_of)
        choices = Choices([stream], n, best_of, keep_logprobs)
        try:
            async for _, resp in choices:
                resp.request_id = request_id
                yield resp
        except ApiError as err:  # Abort, or a deadline: the usage first, then the status
            for last in (stream.ended_early(err) if best_of == n else []):
                last.request_id = request_id
                yield last
            raise
        finally:
            await choices.close()

    @map_errors
    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> generation_pb2.ModelInfo:
        self._authenticate(context)
        info = self._backend.model.to_pb()
        tokenizer = self._backend.tokenizer
        if tokenizer is not None:
            if tokenizer.bos_token_id is not None:
                info.bos_token_id = tokenizer.bos_token_id
            info.text_prompt_adds_special_tokens = tokenizer.adds_special_tokens
        return info

    @map_errors
    async def Abort(self, request: generation_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> generation_pb2.AbortResponse:
        """Cancels the in-flight Generate `request_id` (its stream's last message carries the
        usage so far, then it ends with CANCELLED)."""
        self._authenticate(context)
        return generation_pb2.AbortResponse(aborted=self._backend.abort(request.request_id))


def build_grpc_server(backend: Backend, host: str, port: int,
                      api_key: ApiKey | None = None) -> GrpcServer:
    """The public API server (Generation, Health, reflection), bound, not started; Generation
    requires `api_key` when given. Call inside the running loop."""
    server = GrpcServer(host, port, [GENERATE_METHOD])
    server.add(generation_pb2_grpc.add_GenerationServicer_to_server,
               GenerationServicer(backend, api_key), [GENERATION_SERVICE])
    return server
