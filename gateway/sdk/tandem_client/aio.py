"""The asyncio client: `AsyncClient(target).generate_stream(prompt, **sampling)`.

    async with AsyncClient("localhost:50051") as client:
        async for chunk in client.generate_stream([1, 2, 3], max_tokens=16):
            print(chunk.token_ids)

Create it inside the running event loop (grpc.aio binds the channel to it).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, AsyncIterator

import grpc

from tandem_client import _calls
from tandem_client._pb import generation_pb2
from tandem_client.types import Completion, GenerateChunk, ModelInfo


async def _chunks(attempts: _calls.Attempts) -> AsyncIterator[GenerateChunk]:
    """Retries the call (per the policy) until its first response, then streams. A cancelled
    task or a closed stream cancels the RPC (finally)."""
    received: list[GenerateChunk] = []  # for the error's `partial`
    try:
        for attempt in itertools.count():
            call = attempts.begin()
            if call is None:
                return
            try:
                response = await call.read()
                break
            except grpc.RpcError as rpc:
                delay = attempts.after_failure(attempt, rpc)
            if delay is None:
                return
            await asyncio.sleep(delay)
        while response is not grpc.aio.EOF:
            received.append(GenerateChunk.from_pb(response))
            yield received[-1]
            response = await call.read()
    except grpc.RpcError as rpc:
        attempts.failed(rpc, received)
    finally:
        attempts.cancel()


class AsyncGenerateStream(AsyncIterator[GenerateChunk]):
    """The chunks of one Generate call. Cancelling the task that iterates it, aclose(), or
    leaving its `async with` block cancels the RPC, which aborts the request server-side. The
    RPC starts at the first __anext__()."""

    def __init__(self, attempts: _calls.Attempts) -> None:
        self.request_id = attempts.request_id
        self._attempts = attempts
        self._chunks = _chunks(attempts)

    async def __anext__(self) -> GenerateChunk:
        return await self._chunks.__anext__()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancels the RPC (a no-op once it has ended)."""
        self._attempts.cancel()
        try:
            await self._chunks.aclose()
        except RuntimeError:  # another task is iterating it: the cancel ends it there
            pass


class AsyncClient(_calls.ClientBase):
    """Client's asyncio twin (same arguments; see tandem_client.client.Client)."""

    _channels = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def generate_stream(self, prompt: _calls.Prompt, *, model: str = "",
                        request_id: str | None = None, timeout_s: float | None = None,
                        n: int = 1, best_of: int | None = None,
                        **sampling: Any) -> AsyncGenerateStream:
        """As Client.generate_stream; iterate with `async for`."""
        branches = _calls.Branches(n, best_of)
        return AsyncGenerateStream(self._attempts(prompt, model, request_id, timeout_s,
                                                  branches, sampling))

    async def generate(self, prompt: _calls.Prompt, **kwargs: Any) -> Completion:
        """As Client.generate: one Choice per branch, in index order."""
        async with self.generate_stream(prompt, **kwargs) as stream:
            return Completion.from_chunks([chunk async for chunk in stream])

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        pb = await self._unary(self._stub.GetModelInfo, generation_pb2.GetModelInfoRequest(),
                               timeout_s)
        return ModelInfo.from_pb(pb)

    async def abort(self, request_id: str, *, timeout_s: float | None = None) -> bool:
        """As Client.abort."""
        request = generation_pb2.AbortRequest(request_id=request_id)
        return (await self._unary(self._stub.Abort, request, timeout_s)).aborted

    async def _unary(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        attempts = self._unary_attempts(method, request, timeout_s)
        for attempt in itertools.count():
            try:
                return await attempts.begin()
            except grpc.RpcError as rpc:
                delay = attempts.after_failure(attempt, rpc)
            await asyncio.sleep(delay)
