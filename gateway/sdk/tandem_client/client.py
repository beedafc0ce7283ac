"""The synchronous client: `Client(target).generate_stream(prompt, **sampling)`.

    with Client("localhost:50051", api_key="KEY") as client:
        for chunk in client.generate_stream("Hello", max_tokens=16, temperature=0):
            print(chunk.text, end="")
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterator

import grpc

from tandem_client import _calls
from tandem_client._pb import generation_pb2
from tandem_client.types import Completion, GenerateChunk, ModelInfo


def _chunks(attempts: _calls.Attempts) -> Iterator[GenerateChunk]:
    """Retries the call (per the policy) until its first response, then streams."""
    for attempt in itertools.count():
        call = attempts.begin()
        if call is None:
            return
        try:
            first = next(call, None)
            break
        except grpc.RpcError as rpc:
            delay = attempts.after_failure(attempt, rpc)
        if delay is None:
            return
        time.sleep(delay)
    received: list[GenerateChunk] = []  # for the error's `partial`
    try:
        for response in itertools.chain([first] if first is not None else [], call):
            received.append(GenerateChunk.from_pb(response))
            yield received[-1]
    except grpc.RpcError as rpc:
        attempts.failed(rpc, received)
    finally:
        call.cancel()


class GenerateStream(Iterator[GenerateChunk]):
    """The chunks of one Generate call. Closing it (close(), leaving its `with` block, or
    dropping the last reference, as `break` out of `for chunk in client.generate_stream(...)`
    does) cancels the RPC, which aborts the request server-side; iteration then ends. Any
    thread may call close(). The RPC starts at the first next()."""

    def __init__(self, attempts: _calls.Attempts) -> None:
        self.request_id = attempts.request_id
        self._attempts = attempts
        self._chunks = _chunks(attempts)

    def __next__(self) -> GenerateChunk:
        return next(self._chunks)

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: grpc may be gone already
            pass

    def close(self) -> None:
        """Cancels the RPC (a no-op once it has ended)."""
        self._attempts.cancel()
        try:
            self._chunks.close()
        except ValueError:  # it is running in another thread: the cancel ends it there
            pass


class Client(_calls.ClientBase):
    """A client of one gateway's tandem.v1.Generation (thread-safe; one channel).

    target: "host:port" of the gateway's gRPC API. api_key: sent as `authorization: Bearer KEY`.
    timeout_s: the deadline of every call unless the call gives its own (None: no deadline).
    retry: when UNAVAILABLE is retried (before any response only). on_retry(attempt, delay_s,
    error) is told of each retry. credentials: grpc.ssl_channel_credentials(...) for TLS.
    metadata: more (key, value) pairs sent with every call. options: more channel options.
    """

    _channels = grpc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls still running end with Cancelled."""
        self._channel.close()

    def generate_stream(self, prompt: _calls.Prompt, *, model: str = "",
                        request_id: str | None = None, timeout_s: float | None = None,
                        n: int = 1, best_of: int | None = None,
                        **sampling: Any) -> GenerateStream:
        """Streams the generation of `prompt` (text, or token ids). n: completions (branches)
        returned, their chunks interleaved, each tagged with its `index`; best_of: branches
        generated, of which the n likeliest are returned (sent once all finished). `sampling`:
        SamplingParams fields (max_tokens=16 unless given, temperature, top_p, top_k, seed,
        stop, logprobs, prompt_logprobs, structured_output, ...); unknown names raise
        TypeError. Errors raise TandemError subclasses while iterating (their `partial`: what
        arrived before)."""
        branches = _calls.Branches(n, best_of)
        return GenerateStream(self._attempts(prompt, model, request_id, timeout_s, branches,
                                             sampling))

    def generate(self, prompt: _calls.Prompt, **kwargs: Any) -> Completion:
        """The whole generation (generate_stream's arguments), joined: one Choice per branch,
        in index order."""
        with self.generate_stream(prompt, **kwargs) as stream:
            return Completion.from_chunks(stream)

    def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """The served model (GetModelInfo)."""
        pb = self._unary(self._stub.GetModelInfo, generation_pb2.GetModelInfoRequest(), timeout_s)
        return ModelInfo.from_pb(pb)

    def abort(self, request_id: str, *, timeout_s: float | None = None) -> bool:
        """Aborts the in-flight Generate `request_id` (its stream raises Cancelled); False when
        no request had that id."""
        request = generation_pb2.AbortRequest(request_id=request_id)
        return self._unary(self._stub.Abort, request, timeout_s).aborted

    def _unary(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        attempts = self._unary_attempts(method, request, timeout_s)
        for attempt in itertools.count():
            try:
                return attempts.begin()
            except grpc.RpcError as rpc:
                delay = attempts.after_failure(attempt, rpc)
            time.sleep(delay)
