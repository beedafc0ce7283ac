"""DecodeEngine: admission, the prefill leg and continuous batching for one decode instance.

Block lifetime on this tier (every path ends in `_finish_and_free` on the engine thread):

    queued --admitted--> leased --KV arrives--> running --> finished
      | ^   (prompt blocks   |  ^                   |  |          |
      | |    taken)          '--'  the leg failed with a retryable code: once,
      | |                    |     a new lease on the same blocks, next address
      | '----- preempted (the pool ran out): blocks freed, queued at the head, ------'
      |        then recomputed here (prompt + output so far) without a transfer
      |                      |                      |             |
      '-- aborted            '-- aborted / leg failed / expired --'-------------'--> blocks freed
          (no blocks yet)

n > 1: the request's other branches ride on it (`Request.forks`) until its KV arrives, then
run as requests of their own that share its full prompt blocks (Scheduler._fork); each branch
has its own RequestStream on one output queue and frees its own references on its exit.

Queue: at most `max_queue_len` requests wait for admission; one more is refused at once with
RESOURCE_EXHAUSTED ("queue full (N waiting)"). The count is kept on the event loop: a request
leaves the queue when its leg starts (or when it ends before that).

Prefill leg: the KV is asked of `prefill_addresses[0]`; if that attempt fails with UNAVAILABLE
(the peer is unreachable or went away) or DEADLINE_EXCEEDED (the per-attempt KV timeout, while the
request still has time), it is asked once more of `prefill_addresses[1]`. The failed
attempt's lease is closed first (a late write from the old peer finds NOT_FOUND); the retry gets a
fresh PENDING lease on the same blocks under a new transfer id. Faults of the KV contract
(INTERNAL) and our own aborts (the leg task is cancelled) are never retried.

First token ahead of the KV: the first token arrives with the completed transfer, unless the
request is plain enough to stream it before its KV is in (`_early_eligible`: one branch, no
logprobs of any kind, no grammar, max_tokens > 1). Then the prefill tier sends
it as soon as it is sampled (FirstTokenEarly, ahead of the blocks still to come: most of a
one-chunk prompt's transfer) and it goes to the client at once, unless it would end the request
(a stop token), which the ordinary path then handles. The token the client got is the request's
first token whatever happens next: a retry on another prefill instance recomputes only the KV
(which does not depend on it), and if every attempt fails the request ends with the error
after that token.

Each lease is closed on the event loop before the engine thread frees the blocks, so no transfer
write can land in a block after it was reused.

Threads: methods marked `@event_loop` run on the server's event loop, `@engine_thread` ones on
the engine thread (both checked); they share `_streams` (dict operations only) and hand work to
each other with `core.call` and `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator, Mapping

from engine.detokenizer import IncrementalDetokenizer
from engine.engine_core import EngineCore, engine_thread, event_loop
from engine.errors import (CapacityError, DeadlineError, InvalidRequestError, PeerUnavailableError,
                           TandemError)
from engine.instance import EngineParts
from engine.metrics import StreamTimer, TierMetrics
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams, TokenLogprobs, branch_sampling
from engine.scheduler import SchedulerOutput
from engine.structured import GrammarCache, grammar_for
from engine.tokenizer import Tokenizer
from decode_service.prefill_client import PrefillClient
from decode_service.speculative import (Proposer, SpeculationGovernor, SpeculativeConfig,
                                       propose_drafts)
from decode_service.stream import DecodeOutput, RequestStream
from kvtransfer.lease import Lease, LeaseState, LeaseTable
from protos.tandem.v1 import prefill_pb2

logger = logging.getLogger("decode")

# A lease outlives its leg's deadline by this much, so a transfer that is too late fails the leg
# with DEADLINE_EXCEEDED (the leg's own timeout), never with the lease's NOT_FOUND.
LEASE_GRACE_S = 5.0

# A request's KV is asked of at most this many prefill instances (the first, then one retry).
MAX_PREFILL_ATTEMPTS = 2


class DecodeEngine:
    def __init__(self, parts: EngineParts, leases: LeaseTable, tokenizer: Tokenizer,
                 prefill: PrefillClient, loop: asyncio.AbstractEventLoop, kv_timeout_s: float,
                 max_queue_len: int, speculative: SpeculativeConfig | None = None,
                 proposer: Proposer | None = None, grammars: GrammarCache | None = None):
        if max_queue_len < 1:
            raise ValueError(f"max_queue_len must be at least 1, got {max_queue_len}")
        self.parts = parts
        self.scheduler = parts.scheduler
        self.leases = leases
        self.tokenizer = tokenizer
        self.prefill = prefill
        self.loop = loop
        self.kv_timeout_s = kv_timeout_s
        self.max_queue_len = max_queue_len
        self.speculative = speculative  # None: no drafts (decode_service/speculative.py)
        # the draft model's proposer is built by the server (it loads a model); n-gram lookup here
        self.proposer = proposer or (speculative.ngram_proposer() if speculative else None)
        self.governor = SpeculationGovernor()
        self._proposed_at: float | None = None  # when the last proposal began (a step followed)
        self.clock = time.monotonic  # the governor's (tests replace it)
        self.grammars = grammars  # compiled structured-output grammars; None: refused
        self._num_queued = 0  # requests not yet admitted (event loop only; see _dequeue)
        self.core = EngineCore("decode", parts.scheduler, parts.runner, self)
        self.metrics = TierMetrics("decode", parts.scheduler, leases)
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self.failed = asyncio.Event()  # set once the engine thread died (see on_fatal)

    def start(self) -> None:
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    def validate(self, prompt_token_ids: list[int], prefill_addresses: list[str],
                 n: int = 1) -> None:
        self.parts.check_prompt(prompt_token_ids)
        if not prefill_addresses:
            raise InvalidRequestError("prefill_addresses is empty")
        if not 1 <= n <= self.scheduler.config.max_num_seqs:
            raise InvalidRequestError(f"n must be in [1, {self.scheduler.config.max_num_seqs}] "
                                      f"(this instance's max_num_seqs), got {n}")

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       prefill_addresses: list[str], timeout_s: float | None, n: int = 1
                       ) -> AsyncIterator[tuple[DecodeOutput, RequestStream]]:
        """Yields (output, the stream of its branch, `output.index`) until every one of the
        n branches had its finish_reason; raises a TandemError on failure. Closing the
        iterator early (client gone) aborts every branch in whatever phase it is.

        Branch 0 is the request the prefill leg serves; branches 1..n-1 are its forks (see
        Scheduler._fork), sampled with seed + i. They share one output queue."""
        if self.failed.is_set():
            raise PeerUnavailableError("this decode instance's engine failed; it is shutting down")
        self.validate(prompt_token_ids, prefill_addresses, n)
        sampling.check_prompt_logprobs(len(prompt_token_ids))
        if self._num_queued >= self.max_queue_len:
            raise CapacityError(f"queue full ({self._num_queued} waiting); retry later")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        root_id = f"{request_id}#{next(self._ids)}"
        branches: list[RequestStream] = []
        for index in range(n):  # each branch its own grammar matcher (compiled once, cached)
            request = Request(root_id + (f"/{index}" if index else ""), list(prompt_token_ids),
                              branch_sampling(sampling, index),
                              grammar=await grammar_for(self.grammars, sampling.structured_output))
            branches.append(RequestStream(
                request, IncrementalDetokenizer(
                    self.tokenizer, sampling.stop, sampling.skip_special_tokens,
                    prompt_token_ids=prompt_token_ids,
                    include_stop_str_in_output=sampling.include_stop_str_in_output),
                list(prefill_addresses), deadline, index=index,
                **({"queue": branches[0].queue, "root": branches[0]} if index else {})))
        stream = branches[0]
        stream.set_branches(branches)
        stream.request.forks = [branch.request for branch in branches[1:]]
        for branch in branches:
            self._streams[branch.request.request_id] = branch
        self._num_queued += 1
        stream.queued = True
        timer = StreamTimer(self.metrics, stream.request.num_prompt_tokens, stream.arrival)
        self.core.call(lambda: self.scheduler.add(stream.request), stream.request)
        try:
            while stream.num_open:
                output: DecodeOutput = await stream.queue.get()
                if output.error is not None:
                    timer.fail()
                    raise output.error
                stream.num_open -= output.finish_reason is not None
                timer.output(len(output.token_ids),
                             None if stream.num_open else output.finish_reason)
                if not stream.num_open:
                    self._observe_phases(stream)
                yield output, branches[output.index]
        finally:
            for branch in branches:
                self._streams.pop(branch.request.request_id, None)
            self._dequeue(stream)
            for branch in branches:
                if not branch.done:
                    self._abort(branch, "request cancelled")
            timer.close()

    @event_loop
    def _observe_phases(self, stream: RequestStream) -> None:
        """The phase times of a request that finished (its last output is out of the engine)."""
        self.metrics.phases(queue_s=stream.leg_started - stream.arrival,
                            prefill_s=stream.running_since - stream.leg_started,
                            decode_s=stream.end - stream.running_since)

    # event loop: the prefill leg
    @event_loop
    def _abort(self, stream: RequestStream, reason: str) -> None:
        stream.done = True
        if stream.leg is not None:
            stream.leg.cancel()
        if stream.transfer_id is not None:
            self.leases.close(stream.transfer_id, reason)
        request = stream.request
        self.core.call(lambda: self._finish_and_free(request, RequestStatus.FINISHED_ABORTED, reason))

    @event_loop
    def _dequeue(self, stream: RequestStream) -> None:
        """The request left the admission queue (its leg started, or it ended); idempotent."""
        if stream.queued:
            stream.queued = False
            self._num_queued -= 1

    @event_loop
    def _start_leg(self, request_id: str, block_ids: list[int]) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return  # ended meanwhile; its abort's engine call frees the blocks
        self._dequeue(stream)
        if stream.done:
            return
        stream.leg_started = time.monotonic()
        stream.leg = asyncio.create_task(self._run_leg(stream, block_ids))

    async def _run_leg(self, stream: RequestStream, block_ids: list[int]) -> None:
        """Gets the prompt's KV into `block_ids` and hands the first token to the engine thread,
        trying the prefill addresses in order (at most MAX_PREFILL_ATTEMPTS, see `_retryable`);
        the request fails with the last attempt's error. Each attempt has its own lease, closed
        when the attempt ends, whatever the outcome (also when `_abort` cancels this task)."""
        addresses = stream.prefill_addresses[:MAX_PREFILL_ATTEMPTS]
        for attempt, address in enumerate(addresses):
            budget_s = self._attempt_budget(stream)
            stream.leg_deadline = time.monotonic() + budget_s
            stream.transfer_id = stream.request.request_id + (f"#retry{attempt}" if attempt else "")
            lease = self.leases.create(stream.transfer_id, block_ids,
                                       stream.request.num_prompt_tokens, budget_s + LEASE_GRACE_S)
            if self._early_eligible(stream):
                lease.on_first_token = lambda token_id: self._first_token_early(stream, token_id)
            try:
                response = await self._attempt(stream, lease, address, budget_s)
            except TandemError as exc:
                self.metrics.transfer_failed(exc)
                if attempt + 1 < len(addresses) and self._retryable(stream, exc):
                    self._count_retry(stream, address, addresses[attempt + 1], exc)
                    continue
                self._fail(stream, exc)
                return
            finally:
                self.leases.close(lease.transfer_id, "prefill leg ended")
            self._kv_in(stream, response, lease)
            return

    def _attempt_budget(self, stream: RequestStream) -> float:
        """Seconds the next attempt may take: the KV timeout, capped by the request's deadline."""
        if stream.deadline is None:
            return self.kv_timeout_s
        return min(self.kv_timeout_s, stream.deadline - time.monotonic())

    async def _attempt(self, stream: RequestStream, lease: Lease, address: str,
                       budget_s: float) -> prefill_pb2.PrefillResponse:
        """One Prefill call to `address` into `lease`. Raises a TandemError: the peer's (see
        PrefillClient), DEADLINE_EXCEEDED past `budget_s`, INTERNAL if it returned without the
        lease complete, or without the first token's logprobs or the prompt's when the request
        asked for them (a prefill instance of an older version)."""
        try:
            async with asyncio.timeout(budget_s):
                response = await self.prefill.prefill(stream.request, lease.transfer_id, address,
                                                      self.parts.layout, budget_s,
                                                      lease.on_first_token is not None)
        except TimeoutError:
            raise DeadlineError(f"KV for the prompt did not arrive within {budget_s:.1f} s "
                                f"(prefill instance {address})") from None
        if lease.state is not LeaseState.COMPLETE:
            raise TandemError(f"prefill returned but the KV lease is {lease.state.value}")
        request = stream.request
        if request.sampling.logprobs is not None and lease.first_token_logprobs is None:
            raise TandemError(f"prefill instance {address} sent no logprobs for the first token "
                              "(a version without logprobs?)")
        if (request.sampling.prompt_logprobs is not None
                and len(lease.prompt_logprobs) != request.num_prompt_tokens - 1):
            raise TandemError(f"prefill instance {address} sent {len(lease.prompt_logprobs)} "
                              f"prompt logprobs for a {request.num_prompt_tokens}-token prompt "
                              "(a version without prompt logprobs?)")
        return response

    @staticmethod
    def _early_eligible(stream: RequestStream) -> bool:
        """Whether the request's first token may reach the client before its KV (see the module
        docstring): nothing about it needs the engine's state beyond the token itself."""
        request, sampling = stream.request, stream.request.sampling
        return (not request.forks and request.grammar is None and sampling.logprobs is None
                and sampling.prompt_logprobs is None and sampling.max_tokens > 1)

    @event_loop
    def _first_token_early(self, stream: RequestStream, token_id: int) -> None:
        """The prefill tier sent the first token ahead of the KV (LeaseTable.first_token)."""
        if stream.done or stream.early_first_token is not None:
            return
        stream.early_first_token = token_id
        request = stream.request
        self.core.call(lambda: self._emit_early(request, token_id), request)

    @engine_thread
    def _emit_early(self, request: Request, token_id: int) -> None:
        """Streams the first token while the KV is still on its way, unless it is a stop token
        (left to the ordinary path) or the request is no longer waiting. Its text goes through
        the request's stop strings as any token's: if it completes one, the text ends before it
        and `_kv_arrived` finishes the request (the finish reason follows the KV)."""
        stream = self._streams.get(request.request_id)
        sampling = request.sampling
        if (stream is None or request.status is not RequestStatus.WAITING_FOR_KV
                or token_id in sampling.stop_token_ids
                or (not sampling.ignore_eos and token_id in self.scheduler.eos_token_ids)):
            return
        stream.early_delivered = True
        text = stream.detokenizer.append([token_id], match_stops=sampling.min_tokens < 1).text
        self._deliver(request, DecodeOutput([token_id], text))

    def _retryable(self, stream: RequestStream, error: TandemError) -> bool:
        """Whether another prefill instance may succeed where one failed: the peer was unreachable
        or went away (UNAVAILABLE), or missed the per-attempt KV timeout while the request still
        has time (DEADLINE_EXCEEDED). Other codes (INTERNAL for a KV contract fault, the peer's
        RESOURCE_EXHAUSTED, ...) are final."""
        if error.status == "UNAVAILABLE":
            return True
        return error.status == "DEADLINE_EXCEEDED" and (
            stream.deadline is None or time.monotonic() < stream.deadline)

    @event_loop
    def _count_retry(self, stream: RequestStream, failed: str, next_address: str,
                     error: TandemError) -> None:
        self.metrics.prefill_retries.inc()
        logger.warning("request %s: prefill instance %s failed (%s: %s); retrying on %s",
                       stream.request.request_id, failed, error.status, error, next_address)

    @event_loop
    def _kv_in(self, stream: RequestStream, response: prefill_pb2.PrefillResponse,
               lease: Lease) -> None:
        """The prompt's KV is in `lease`: records the leg, hands the first token to the engine."""
        request = stream.request
        stream.prefill_queue_s, stream.prefill_s = response.queue_s, response.compute_s
        stream.num_cached_tokens = response.num_cached_tokens
        stream.transfer_bytes, stream.transfer_s = lease.bytes_received, lease.transfer_s
        self.metrics.transfer_done(lease.bytes_received, lease.transfer_s)
        self.core.call(lambda: self._kv_arrived(request, lease), request)

    @event_loop
    def _fail(self, stream: RequestStream, error: TandemError) -> None:
        """The prefill leg failed: the request ends with `error`, its blocks are freed."""
        logger.warning("request %s failed: %s", stream.request.request_id, error)
        stream.done = True
        stream.queue.put_nowait(DecodeOutput([], "", error=error))
        request = stream.request
        self.core.call(lambda: self._finish_and_free(request, RequestStatus.FINISHED_ERROR, str(error)))

    @event_loop
    def _engine_failed(self, error: BaseException) -> None:
        """The engine thread is gone: every request ends with UNAVAILABLE, leases close."""
        self.failed.set()
        for stream in list(self._streams.values()):
            if stream.transfer_id is not None:
                self.leases.close(stream.transfer_id, "decode engine failed")
            if stream.leg is not None:
                stream.leg.cancel()
            if not stream.done:
                stream.done = True
                stream.queue.put_nowait(DecodeOutput([], "", error=PeerUnavailableError(
                    f"decode engine failed: {type(error).__name__}: {error}")))

    # engine thread
    @engine_thread
    def on_fatal(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self._engine_failed, error)

    @engine_thread
    def _finish_and_free(self, request: Request, status: RequestStatus, reason: str) -> None:
        if not request.status.finished:
            self.scheduler.finish(request, status, reason)
        if request.block_ids:
            self.scheduler.free_blocks(request)
        if self.proposer is not None:
            self.proposer.forget(request.request_id)

    @engine_thread
    def _kv_arrived(self, request: Request, lease: Lease) -> None:
        """The lease is complete (and closed: the engine thread only reads its results). A first
        token the client already has (`_emit_early`) is the request's, whichever attempt's KV
        this is; only the finish it may cause is left to deliver."""
        stream = self._streams.get(request.request_id)
        early = stream is not None and stream.early_delivered
        first = stream.early_first_token if early else lease.first_token_id
        if self.scheduler.kv_arrived(request.request_id, first) is None:
            return
        if request.status is RequestStatus.FINISHED_ERROR:  # the grammar refused the token
            self._free_and_deliver(request, DecodeOutput([], "", error=TandemError(request.error)))
            return
        if stream is not None:
            for branch in stream.branches:
                branch.running_since = time.monotonic()
        if not early:
            self._emit(request, [first], lease.first_token_logprobs, lease.prompt_logprobs)
            return
        stopped = stream.detokenizer.stopped  # the early token completed a stop string
        if stopped and request.status in (RequestStatus.RUNNING, RequestStatus.FINISHED_LENGTH):
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)  # a stop string wins
        if request.status.finished:  # or e.g. the prompt and the token fill max_model_len
            self._free_and_deliver(request, DecodeOutput(
                [], "" if stopped else stream.detokenizer.flush(), request.status.value))

    @engine_thread
    def on_admitted_for_kv(self, requests: list[Request]) -> None:
        for request in requests:
            self.loop.call_soon_threadsafe(self._start_leg, request.request_id,
                                           list(request.block_ids))

    @engine_thread
    def on_step(self, output: SchedulerOutput, sampled: dict[str, int | list[int]],
                finished: list[Request], logprobs: Mapping[str, TokenLogprobs]) -> None:
        for request, num_tokens in output.chunks:
            try:
                if request.status is RequestStatus.FINISHED_ERROR:
                    self._free_and_deliver(request, DecodeOutput([], "", error=TandemError(request.error)))
                elif request.request_id in sampled:
                    tokens = sampled[request.request_id]
                    if isinstance(tokens, list):  # drafts were scored: the verified tokens
                        self._count_drafts(request, num_tokens - 1, len(tokens) - 1)
                    else:
                        tokens = [tokens]
                    self._emit(request, tokens, logprobs.get(request.request_id))
            except Exception as exc:  # noqa: BLE001 - this request fails, the batch goes on
                logger.exception("request %s: delivering its output failed", request.request_id)
                self.scheduler.finish(request, RequestStatus.FINISHED_ERROR, f"output failed: {exc}")
                self._free_and_deliver(request, DecodeOutput([], "", error=TandemError(request.error)))

        if self.speculative is not None:
            self._observe_step(output, sampled)
            self._propose()

    @engine_thread
    def _count_drafts(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        request.num_draft_tokens += num_drafts
        request.num_accepted_draft_tokens += num_accepted
        self.metrics.drafts(num_drafts, num_accepted)

    @engine_thread
    def _observe_step(self, output: SchedulerOutput,
                      sampled: Mapping[str, int | list[int]]) -> None:
        """Tells the governor what the step just run produced, and in how long since the last
        proposal began (the proposal's own work is part of the cost of drafting)."""
        if self._proposed_at is None or not output.chunks:
            return
        seconds = self.clock() - self._proposed_at
        tokens = [sampled[r.request_id] for r, _ in output.chunks if r.request_id in sampled]
        speculated = any(isinstance(t, list) for t in tokens)
        self.governor.observe(len(output.chunks), speculated,
                              sum(len(t) if isinstance(t, list) else 1 for t in tokens), seconds)
        self.metrics.spec_steps.labels("decode", "draft" if speculated else "plain").inc()

    @engine_thread
    def _propose(self) -> None:
        """Drafts for the next step (`propose_drafts`); starts the clock the governor times
        the next step by."""
        running = self.scheduler.running
        # a step follows at once only while requests run (else the clock would count idling)
        self._proposed_at = self.clock() if running else None
        propose_drafts(self.speculative, self.proposer, self.governor, running)

    @engine_thread
    def _emit(self, request: Request, token_ids: list[int],
              logprobs: TokenLogprobs | None = None,
              prompt_logprobs: tuple[TokenLogprobs, ...] = ()) -> None:
        """Detokenizes new tokens, applies stop strings and hands the output to the loop (with
        the token's logprobs when the request asked, and with the first token the prompt's).
        The text of a stop token (EOS or stop_token_ids) is left out unless
        include_stop_str_in_output (then it is decoded as any token: a special one still shows
        only without skip_special_tokens), as vLLM does; its logprobs are not."""
        stream = self._streams.get(request.request_id)
        if stream is None:  # the client went away; its abort frees the blocks
            return
        visible = token_ids
        stop_id = request.stop_token_id
        if (stop_id is not None and token_ids and token_ids[-1] == stop_id
                and not request.sampling.include_stop_str_in_output):
            visible = token_ids[:-1]
        # stop strings match only in the text after the first min_tokens tokens (as vLLM)
        step = stream.detokenizer.append(
            visible, match_stops=request.num_output_tokens > request.sampling.min_tokens)
        if step.stopped and request.status in (RequestStatus.RUNNING, RequestStatus.FINISHED_LENGTH):
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)  # a stop string wins
        text = step.text
        reason = None
        if request.status.finished:
            text += "" if step.stopped else stream.detokenizer.flush()
            reason = request.status.value
        self._free_and_deliver(request, DecodeOutput(token_ids, text, reason,
                                                     logprobs=(logprobs,) if logprobs else (),
                                                     prompt_logprobs=prompt_logprobs))

    @engine_thread
    def _free_and_deliver(self, request: Request, output: DecodeOutput) -> None:
        if request.status.finished:
            if request.block_ids:
                self.scheduler.free_blocks(request)
            if self.proposer is not None:
                self.proposer.forget(request.request_id)
        self._deliver(request, output)

    @engine_thread
    def _deliver(self, request: Request, output: DecodeOutput) -> None:
        stream = self._streams.get(request.request_id)
        if stream is None:
            return
        if output.finish_reason is not None or output.error is not None:
            stream.done = True
            stream.finished_at = time.monotonic()
        if stream.first_output is None and output.token_ids:
            stream.first_output = time.monotonic()
        self.loop.call_soon_threadsafe(stream.queue.put_nowait,
                                       output._replace(index=stream.index))
