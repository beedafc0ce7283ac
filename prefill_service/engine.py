"""PrefillEngine: the engine thread plus, per request, an OutgoingTransfer fed after every step.

Block lifetime on this tier: admission takes the prompt's blocks (prefix hits shared); they are
freed only after the transfer ended (acknowledged, failed or cancelled), so the transport never
reads a block that was reused. Full prompt blocks stay in the prefix cache after that.

Threads: `prefill()` and `@event_loop` methods run on the server's event loop, `@engine_thread`
ones on the engine thread (checked); `_transfers` is shared (dict operations only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Mapping, NamedTuple

import torch

from engine.engine_core import EngineCore, engine_thread, event_loop
from engine.errors import PeerUnavailableError, TandemError
from engine.instance import EngineParts
from engine.metrics import TierMetrics
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams, TokenLogprobs
from engine.scheduler import SchedulerOutput
from engine.structured import GrammarCache, grammar_for
from kvtransfer.sender import FirstToken, KvDestination, KvTransport, OutgoingTransfer


class PrefillResult(NamedTuple):
    first_token_id: int
    num_cached_tokens: int
    queue_s: float
    compute_s: float
    bytes_sent: int


class PrefillEngine:
    """Thread-safe entry point `prefill()` (a coroutine on the server's loop)."""

    def __init__(self, parts: EngineParts, transport: KvTransport, loop: asyncio.AbstractEventLoop,
                 grammars: GrammarCache | None = None):
        self.parts = parts
        self.grammars = grammars  # compiled structured-output grammars; None: refused
        self.transport = transport
        self.loop = loop
        self.block_size = parts.layout.block_size
        self.core = EngineCore("prefill", parts.scheduler, parts.runner, self)
        self.metrics = TierMetrics("prefill", parts.scheduler)
        self._transfers: dict[str, OutgoingTransfer] = {}  # engine request id -> transfer
        self._ids = itertools.count()
        self.failed = asyncio.Event()  # set once the engine thread died (see on_fatal)

    def start(self) -> None:
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    async def prefill(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                      destination: KvDestination, timeout_s: float | None) -> PrefillResult:
        """Computes and pushes the prompt's KV; returns after the receiver acknowledged."""
        if self.failed.is_set():
            raise PeerUnavailableError("this prefill instance's engine failed; it is shutting down")
        self.parts.check_prompt(prompt_token_ids)
        sampling.check_prompt_logprobs(len(prompt_token_ids))
        engine_id = f"{request_id}#{next(self._ids)}"  # a retried request may arrive twice
        grammar = await grammar_for(self.grammars, sampling.structured_output)  # masks token 1
        request = Request(engine_id, list(prompt_token_ids),
                          dataclasses.replace(sampling, max_tokens=1), grammar=grammar)
        transfer = OutgoingTransfer(len(prompt_token_ids))
        self._transfers[engine_id] = transfer
        self.core.call(lambda: self.parts.scheduler.add(request), request)
        try:
            report = await self.transport.push(destination, transfer, timeout_s)
        except TandemError as exc:
            self.metrics.transfer_failed(exc)
            self.metrics.ended("error")
            raise
        except asyncio.CancelledError:
            self.metrics.ended("abort")
            raise
        finally:
            self._transfers.pop(engine_id, None)
            self.core.call(lambda: self._release(request))
        # the engine thread wrote these before it handed over the first token (happens-before)
        scheduled = request.first_scheduled_time or request.arrival_time
        result = PrefillResult(transfer.first_token_id, request.num_cached_tokens,
                               scheduled - request.arrival_time,
                               (request.finished_time or scheduled) - scheduled, report.bytes_sent)
        self._record(request, result)
        return result

    @event_loop
    def _record(self, request: Request, result: PrefillResult) -> None:
        """Metrics of a prefill whose transfer was acknowledged: its one token, the time to it,
        its phases and bytes."""
        metrics = self.metrics
        metrics.first_token(request.num_prompt_tokens, result.queue_s + result.compute_s)
        metrics.generation_tokens.inc()
        metrics.ended("length", time.monotonic() - request.arrival_time)
        metrics.phases(queue_s=result.queue_s, prefill_s=result.compute_s)
        metrics.transfer_done(result.bytes_sent)

    @event_loop
    def _engine_failed(self, error: BaseException) -> None:
        """The engine thread is gone: every transfer aborts (its push raises)."""
        self.failed.set()
        failure = PeerUnavailableError(f"prefill engine failed: {type(error).__name__}: {error}")
        for transfer in list(self._transfers.values()):
            transfer.on_progress([], None, failure)

    # engine thread
    @engine_thread
    def on_fatal(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self._engine_failed, error)

    @engine_thread
    def _release(self, request: Request) -> None:
        if not request.status.finished:
            self.parts.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self.parts.scheduler.free_blocks(request)

    @engine_thread
    def on_admitted_for_kv(self, requests: list[Request]) -> None:
        raise AssertionError("the prefill tier computes its own KV")

    @engine_thread
    def on_step(self, output: SchedulerOutput, sampled: dict[str, int], finished: list[Request],
                logprobs: Mapping[str, TokenLogprobs]) -> None:
        ready_event = None  # CUDA: the senders read the step's blocks once its kernels are done
        if self.parts.runner.device.type == "cuda" and output.chunks:
            ready_event = torch.cuda.Event()
            ready_event.record()
        for request, _ in output.chunks:
            num_ready = request.num_computed_tokens // self.block_size
            error, first = None, None
            if request.status is RequestStatus.FINISHED_ERROR:
                error = TandemError(request.error or "prefill failed")
            elif request.request_id in sampled:
                num_ready = len(request.block_ids)  # the last, partial block too
                first = FirstToken(sampled[request.request_id], logprobs.get(request.request_id),
                                   self._prompt_logprobs(request))
                if first.prompt_logprobs is not None and \
                        len(first.prompt_logprobs) != request.num_prompt_tokens - 1:
                    first, error = None, TandemError(  # never expected: no prefix-cache hits
                        f"{len(first.prompt_logprobs)} prompt logprobs for a "
                        f"{request.num_prompt_tokens}-token prompt")
            self._notify(request, request.block_ids[:num_ready], first, error, ready_event)

    @staticmethod
    def _prompt_logprobs(request: Request) -> tuple[TokenLogprobs, ...] | None:
        """The prompt logprobs of a request that asked (one per prompt token but the first)."""
        if request.sampling.prompt_logprobs is None:
            return None
        return tuple(request.prompt_logprobs)

    @engine_thread
    def _notify(self, request: Request, ready: list[int], first: FirstToken | None = None,
                error: BaseException | None = None,
                ready_event: torch.cuda.Event | None = None) -> None:
        transfer = self._transfers.get(request.request_id)
        if transfer is not None:
            self.loop.call_soon_threadsafe(transfer.on_progress, ready, first, error, ready_event)
