"""What both public APIs call: start a request on a (prefill, decode) pair, stream its
responses, abort it by id, and count traffic for the logs.

    Backend.start() -> RequestStream   picks instances, opens Decode.Generate with a deadline
    async for resp in stream           GenerateResponse messages; errors arrive as ApiError
    await stream.close()               cancels the call if still open (aborts it everywhere),
                                       releases the instances, logs one line per request

A decode instance that fails under a request (its call ends UNAVAILABLE and its health check
fails too) is taken out of the routing at once, until the health loop finds it SERVING again;
a request that had no response from it yet is opened again, once, on another ready decode
instance (nothing reached the client, so the move is invisible); one that had responses ends
with the error (an SSE error event, gRPC UNAVAILABLE).

Single event loop: no locking.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from engine.metrics import StreamTimer
from engine.sampling_params import STRUCTURED_ERROR_PREFIX
from engine.tokenizer import Tokenizer
from gateway.convert import ModelSpec, finish_reason
from gateway.errors import ApiError, from_rpc_error
from gateway.metrics import GatewayMetrics
from gateway.routing import Instance, InstanceRegistry
from protos.tandem.v1 import common_pb2, decode_pb2, generation_pb2, instance_pb2

logger = logging.getLogger("tandem.gateway")

# After the last message, how long close() waits for the call's status before cancelling it.
FINAL_STATUS_WAIT_S = 1.0


def _task_cancelling() -> bool:
    """Whether the current task itself is being cancelled (not just the call)."""
    task = asyncio.current_task()
    return bool(task is not None and getattr(task, "cancelling", lambda: 1)())


@dataclass(slots=True)
class GatewayStats:
    """Counters since the last `report`; `num_inflight` is current."""

    num_inflight: int = 0
    num_finished: int = 0
    num_generated_tokens: int = 0
    last_report: float = 0.0

    def report(self, now: float) -> str | None:
        """A throughput line for the interval since the last call, or None if it was idle."""
        elapsed, self.last_report = now - self.last_report, now
        if not (self.num_finished or self.num_generated_tokens or self.num_inflight):
            return None
        line = (f"throughput: {self.num_finished / elapsed:.2f} req/s, "
                f"{self.num_generated_tokens / elapsed:.1f} generated tok/s, "
                f"in-flight {self.num_inflight}")
        self.num_finished = self.num_generated_tokens = 0
        return line


class RequestStream:
    """One in-flight Decode.Generate call; iterate for GenerateResponse, then `close()`. With
    n > 1 (`request.n`) the messages of the n branches interleave, each with its `index`; the
    stream ends after every branch's finish message."""

    def __init__(self, backend: Backend, request_id: str, num_prompt_tokens: int,
                 instances: tuple[Instance, Instance], call: grpc.aio.UnaryStreamCall,
                 request: decode_pb2.DecodeRequest | None = None,
                 deadline: float | None = None) -> None:
        """`request` and `deadline` (time.monotonic() seconds) let it `move` to another decode
        instance; without them it never does."""
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.started = time.monotonic()
        self.deadline = deadline
        self.first_token_at: float | None = None
        self.num_responses = 0
        self.num_generated_tokens = 0
        self.num_moves = 0  # times it was opened again on another decode instance
        self.num_branches = max(request.n, 1) if request is not None else 1
        # the last message, once every branch had its finish message
        self.final: generation_pb2.GenerateResponse | None = None
        self.finals: dict[int, generation_pb2.GenerateResponse] = {}  # branch -> finish message
        # per branch: its tokens' logprobs so far, when the request asked (sampling.logprobs)
        self.logprobs: list[list[common_pb2.TokenLogprobs]] = [[] for _ in range(self.num_branches)]
        self.num_tokens: list[int] = [0] * self.num_branches  # per branch
        # the prompt's, when the request asked (sampling.prompt_logprobs; on the first response)
        self.prompt_logprobs: list[common_pb2.TokenLogprobs] = []
        self.instances = instances
        self.request = request
        # the request field that set its grammar: named by a tier's STRUCTURED_ERROR_PREFIX error
        self.structured_param: str | None = None
        self._backend, self._call = backend, call
        self._aborted = False
        self._finish_on_abort = False
        self._ending = False  # ending with ABORT messages, one per open branch
        self._outcome = "cancelled"
        self._timer = StreamTimer(backend.metrics, self.num_prompt_tokens, self.started)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> generation_pb2.GenerateResponse:
        """The next response. Raises ApiError for a failed call (CANCELLED after `abort`),
        StopAsyncIteration after the message carrying finish_reason."""
        if self.final is not None:
            raise StopAsyncIteration
        if self._ending:
            return self._abort_response()
        while True:
            try:
                resp = await self._call.read()
                break
            except grpc.RpcError as e:
                if self._finish_on_abort and e.code() == grpc.StatusCode.CANCELLED:
                    return self._abort_response()
                if not await self._backend.moved(self, e):
                    raise self._fail(from_rpc_error(e)) from e
            except asyncio.CancelledError:
                if not self._aborted or _task_cancelling():
                    raise
                if self._finish_on_abort:
                    return self._abort_response()
                raise self._fail(ApiError(grpc.StatusCode.CANCELLED, "request aborted")) from None
        if resp is grpc.aio.EOF:
            raise self._fail(ApiError(grpc.StatusCode.INTERNAL, "the decode tier ended "
                                         "the stream without a finish reason"))
        self._observe(resp)
        return resp

    def _observe(self, resp: generation_pb2.GenerateResponse) -> None:
        self.num_responses += 1
        if resp.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if resp.index >= self.num_branches or resp.index in self.finals:
            raise self._fail(ApiError(grpc.StatusCode.INTERNAL, f"the decode tier sent a "
                                      f"message for branch {resp.index}, which is not open"))
        self.num_generated_tokens += len(resp.token_ids)
        self.num_tokens[resp.index] += len(resp.token_ids)
        self.logprobs[resp.index].extend(resp.logprobs)
        self.prompt_logprobs.extend(resp.prompt_logprobs)
        self._backend.stats.num_generated_tokens += len(resp.token_ids)
        reason = None
        if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finals[resp.index] = resp
            if len(self.finals) == self.num_branches:
                self.final = resp
                self._outcome = reason = finish_reason(resp.finish_reason) or "unknown"
        self._timer.output(len(resp.token_ids), reason)

    def _fail(self, err: ApiError) -> ApiError:
        if (err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and err.param is None
                and err.message.startswith(STRUCTURED_ERROR_PREFIX)):
            err.param = self.structured_param
        self._outcome = f"error {err.grpc_code.name}: {err.message}"
        self._timer.fail(cancelled=err.grpc_code == grpc.StatusCode.CANCELLED)
        return err

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The backend's tokenizer (token texts of the logprobs)."""
        return self._backend.tokenizer

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def move(self, decode: Instance) -> None:
        """Opens the request again on `decode`, with what is left of its deadline (the caller
        checked that no response arrived and that time is left)."""
        old = self.instances[0]
        self._call.cancel()
        self._call = decode.decode_stub().Generate(
            self.request, timeout=self.deadline - time.monotonic())
        self._backend.registry.release(old)
        self._backend.registry.acquire(decode)
        self.instances = (decode, self.instances[1])
        self.num_moves += 1

    def abort(self, finish: bool = False) -> None:
        """Cancels the call (the tiers abort the request). The reader gets CANCELLED, or with
        finish=True a last response with finish_reason ABORT and the usage so far (OpenAI
        finish_reason "abort"): a normal end for a request the server cut short."""
        self._aborted = True
        self._finish_on_abort = finish
        self._call.cancel()

    def usage_so_far(self) -> common_pb2.Usage:
        """The prompt's tokens and those generated so far, as the gateway counted them (the
        prefix-cache hits are known only to the tiers' last message)."""
        return common_pb2.Usage(prompt_tokens=self.num_prompt_tokens,
                                completion_tokens=self.num_generated_tokens)

    def ended_early(self, err: ApiError) -> list[generation_pb2.GenerateResponse]:
        """The last messages for a stream that failed with `err` before its end, when the server
        can still send them: after `abort` (the public Abort; CANCELLED) or a deadline the
        gateway saw pass (DEADLINE_EXCEEDED): for each branch still open, finish_reason ABORT
        and its usage so far. None for other errors. The stream's outcome stays the error."""
        aborted = self._aborted and err.grpc_code == grpc.StatusCode.CANCELLED
        if not (aborted or err.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED):
            return []
        return [self._abort_message(index) for index in sorted(self._open_branches())]

    def _open_branches(self) -> set[int]:
        return set(range(self.num_branches)) - set(self.finals)

    def _abort_message(self, index: int) -> generation_pb2.GenerateResponse:
        """A last message of a branch the server ended early: ABORT, its usage so far."""
        return generation_pb2.GenerateResponse(
            request_id=self.request_id, finish_reason=common_pb2.FINISH_REASON_ABORT,
            usage=common_pb2.Usage(prompt_tokens=self.num_prompt_tokens,
                                   completion_tokens=self.num_tokens[index]), index=index)

    def _abort_response(self) -> generation_pb2.GenerateResponse:
        """The ABORT message of the first branch still open (the next read gives the next)."""
        self._ending = True
        resp = self._abort_message(min(self._open_branches()))
        self._observe(resp)
        return resp

    async def close(self) -> None:
        """Idempotent: cancels an unfinished call (after the last message, first waits briefly
        for its OK status so the tier sees a normal end), releases the instances, logs."""
        if not self._backend.forget(self):
            return
        try:
            if self.final is not None and not self._call.done():
                await asyncio.wait_for(self._call.code(), FINAL_STATUS_WAIT_S)
        except (asyncio.TimeoutError, grpc.RpcError):
            pass
        finally:
            self._call.cancel()
            self._log()
            self._timer.close()

    def _log(self) -> None:
        e2e = time.monotonic() - self.started
        ttft = "-" if self.ttft_s is None else f"{self.ttft_s:.3f}s"
        decode, prefill = self.instances
        logger.info("request %s: prompt=%d completion=%d ttft=%s e2e=%.3fs finish=%s "
                    "decode=%s prefill=%s", self.request_id, self.num_prompt_tokens,
                    self.num_generated_tokens, ttft, e2e, self._outcome, decode.address,
                    prefill.address)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Backend:
    """The served model, its tokenizer, the instances and the requests in flight."""

    def __init__(self, model: ModelSpec, registry: InstanceRegistry,
                 tokenizer: Tokenizer | None, request_timeout_s: float = 600.0) -> None:
        self.model, self.registry, self.tokenizer = model, registry, tokenizer
        self.request_timeout_s = request_timeout_s
        self.stats = GatewayStats(last_report=time.monotonic())
        self.metrics = GatewayMetrics(lambda: self.stats.num_inflight)
        self._streams: dict[str, RequestStream] = {}

    def start(self, request_id: str, prompt_ids: list[int], sampling: common_pb2.SamplingParams,
              timeout_s: float | None = None, n: int = 1) -> RequestStream:
        """Opens Decode.Generate on the least-loaded (decode, prefill) pair with a deadline of
        min(timeout_s, request_timeout_s); the other ready prefill instances follow the chosen
        one in `prefill_addresses`, for the decode tier to retry on; `n` branches share the
        one prefill (see decode.proto). Raises ApiError:
        UNAVAILABLE when a tier has no ready instance, INVALID_ARGUMENT when request_id is
        already in flight."""
        if request_id in self._streams:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"request_id {request_id!r} is already in flight", "request_id")
        decode = self.registry.pick(instance_pb2.ROLE_DECODE)
        prefill = self.registry.pick(instance_pb2.ROLE_PREFILL)
        prefills = [prefill, *self.registry.fallbacks(prefill)]
        request = decode_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                           sampling=sampling,
                                           prefill_addresses=[i.address for i in prefills],
                                           n=n)
        deadline = self.request_timeout_s if timeout_s is None else min(
            max(timeout_s, 0.001), self.request_timeout_s)
        call = decode.decode_stub().Generate(request, timeout=deadline)
        stream = RequestStream(self, request_id, len(prompt_ids), (decode, prefill), call,
                               request, time.monotonic() + deadline)
        self._streams[request_id] = stream
        self.registry.acquire(decode, prefill)
        self.stats.num_inflight += 1
        return stream

    async def moved(self, stream: RequestStream, error: grpc.RpcError) -> bool:
        """Whether `stream`, whose call failed with `error`, was opened again on another decode
        instance (see the module docstring). An UNAVAILABLE call whose decode instance then
        fails its health check takes that instance out of the routing (until the health loop
        finds it SERVING); an instance that still answers SERVING gave the error for the
        request's own sake (a prefill peer gone, say) and keeps its place."""
        decode = stream.instances[0]
        if error.code() != grpc.StatusCode.UNAVAILABLE or stream._aborted:
            return False
        if await decode.check_health():
            return False
        logger.warning("decode instance %s failed under request %s (%s); routing around it "
                       "until its health check passes", decode.address, stream.request_id,
                       error.details())
        self.metrics.decode_failures.inc()
        if (stream._aborted or stream.num_responses or stream.num_moves or stream.request is None
                or stream.deadline - time.monotonic() <= 0):
            return False
        try:
            other = self.registry.pick(instance_pb2.ROLE_DECODE)
        except ApiError:
            return False
        logger.info("request %s: opened again on decode instance %s", stream.request_id,
                    other.address)
        self.metrics.requests_moved.inc()
        stream.move(other)
        return True

    def forget(self, stream: RequestStream) -> bool:
        """Unregisters `stream` and releases its instances; False if already done."""
        if self._streams.get(stream.request_id) is not stream:
            return False
        del self._streams[stream.request_id]
        self.registry.release(*stream.instances)
        self.stats.num_inflight -= 1
        self.stats.num_finished += 1
        return True

    def abort(self, request_id: str) -> bool:
        """Aborts the in-flight request `request_id`; False when there is none."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        stream.abort()
        return True

    def abort_all(self) -> int:
        """Ends every request in flight with finish_reason ABORT (shutdown past its grace
        period); returns how many."""
        streams = list(self._streams.values())
        for stream in streams:
            stream.abort(finish=True)
        return len(streams)

    async def check_health(self) -> tuple[bool, dict[str, bool]]:
        """(each tier has a SERVING instance, address -> SERVING). Instances that are not
        SERVING are skipped by the routing until a later check finds them SERVING."""
        results = await self.registry.check_health()
        tiers = (self.registry.prefill, self.registry.decode)
        return all(any(results[i.address] for i in tier) for tier in tiers), results

    async def close(self) -> None:
        for stream in list(self._streams.values()):
            await stream.close()
        await self.registry.close()
