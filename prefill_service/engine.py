"""PrefillEngine: the engine thread plus, per request, an OutgoingTransfer fed after every step.

Block lifetime on this tier: admission takes the prompt's blocks (prefix hits shared); they are
freed only after the transfer ended (acknowledged, failed or cancelled), so the transport never
reads a block that was reused. Full prompt blocks stay in the prefix cache after that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import NamedTuple

from engine.engine_core import EngineCore
from engine.errors import CapacityError, TandemError
from engine.instance import EngineParts
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from kvtransfer.sender import KvDestination, KvTransport, OutgoingTransfer


class PrefillResult(NamedTuple):
    first_token_id: int
    num_cached_tokens: int
    queue_s: float
    compute_s: float
    bytes_sent: int


class PrefillEngine:
    """Thread-safe entry point `prefill()` (a coroutine on the server's loop)."""

    def __init__(self, parts: EngineParts, transport: KvTransport, loop: asyncio.AbstractEventLoop):
        self.parts = parts
        self.transport = transport
        self.loop = loop
        self.block_size = parts.layout.block_size
        self.core = EngineCore("prefill", parts.scheduler, parts.runner, self)
        self._transfers: dict[str, OutgoingTransfer] = {}  # engine request id -> transfer
        self._timing: dict[str, list[float]] = {}
        self._ids = itertools.count()

    def start(self) -> None:
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    async def prefill(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                      destination: KvDestination, timeout_s: float | None) -> PrefillResult:
        """Computes and pushes the prompt's KV; returns after the receiver acknowledged."""
        self.parts.check_prompt(prompt_token_ids)
        engine_id = f"{request_id}#{next(self._ids)}"  # a retried request may arrive twice
        request = Request(engine_id, list(prompt_token_ids),
                          dataclasses.replace(sampling, max_tokens=1))
        transfer = OutgoingTransfer(len(prompt_token_ids))
        self._transfers[engine_id] = transfer
        self.core.call(lambda: self.parts.scheduler.add(request))
        try:
            report = await self.transport.push(destination, transfer, timeout_s)
        finally:
            self._transfers.pop(engine_id, None)
            self.core.call(lambda: self._release(request))
        arrival, first, done = self._timing.pop(engine_id, [request.arrival_time] * 3)
        return PrefillResult(transfer.first_token_id, request.num_cached_tokens, first - arrival,
                             done - first, report.bytes_sent)

    # engine thread
    def _release(self, request: Request) -> None:
        if not request.status.finished:
            self.parts.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self.parts.scheduler.free_blocks(request)
        self._timing.pop(request.request_id, None)

    def on_admitted_for_kv(self, requests: list[Request]) -> None:
        raise AssertionError("the prefill tier computes its own KV")

    def on_rejected(self, requests: list[Request]) -> None:
        for request in requests:
            self._notify(request, [], error=CapacityError(f"prefill KV cache: {request.error}"))

    def on_step(self, output: SchedulerOutput, sampled: dict[str, int],
                finished: list[Request]) -> None:
        now = time.monotonic()
        for request, _ in output.chunks:
            timing = self._timing.setdefault(
                request.request_id, [request.arrival_time, request.first_scheduled_time or now, now])
            num_ready = request.num_computed_tokens // self.block_size
            error = None
            if request.status is RequestStatus.FINISHED_ERROR:
                error = TandemError(request.error or "prefill failed")
            elif request.request_id in sampled:
                timing[2] = now
                num_ready = len(request.block_ids)  # the last, partial block too
            self._notify(request, request.block_ids[:num_ready], sampled.get(request.request_id),
                         error)

    def _notify(self, request: Request, ready: list[int], first_token_id: int | None = None,
                error: BaseException | None = None) -> None:
        transfer = self._transfers.get(request.request_id)
        if transfer is not None:
            self.loop.call_soon_threadsafe(transfer.on_progress, ready, first_token_id, error)
