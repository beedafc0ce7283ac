"""One token-budget scheduler for both tiers. It holds no tensors.

Each step: running requests first (FIFO), each given `num_tokens - num_computed_tokens` tokens
(capped by what is left of the budget), then waiting requests are admitted while the pool can
hold them. A prompt therefore runs in chunks of at most `max_num_batched_tokens`; a decode
request needs one token a step.

Block accounting: admission takes the prompt's blocks and *reserves* the blocks the request may
still grow into (up to max_tokens or the context length). Growth allocates from that reservation,
so a running request never finds the pool empty and nothing is ever preempted. The price is
conservative admission when max_tokens is large (docs/design.md).

On the decode tier (`kv_from_remote`), admission does not schedule compute: the request moves to
WAITING_FOR_KV and is reported in `SchedulerOutput.admitted_for_kv`; the engine starts its KV
transfer and calls `kv_arrived` when the blocks are filled.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from engine.block_pool import BlockPool, prefix_block_hashes
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget per step (the prefill chunk limit)
    max_num_seqs: int = 64              # running + waiting-for-KV requests
    block_size: int = 16
    max_model_len: int = 2048
    kv_from_remote: bool = False        # decode tier: prompt KV arrives by transfer


class ScheduledChunk(NamedTuple):
    request: Request
    num_tokens: int  # tokens at positions [num_computed_tokens, num_computed_tokens + num_tokens)


class SchedulerOutput(NamedTuple):
    chunks: list[ScheduledChunk]
    admitted_for_kv: list[Request]  # decode tier: blocks leased this step, start their transfer
    rejected: list[Request]         # can never fit the pool; finished with FINISHED_ERROR


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """Owns the waiting queue, the running list and the block reservations (not thread-safe)."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool, eos_token_ids: frozenset[int]):
        self.config = config
        self.pool = pool
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Request] = deque()
        self.waiting_for_kv: dict[str, Request] = {}
        self.running: list[Request] = []
        self._reserved: dict[str, int] = {}  # request_id -> blocks promised but not yet taken

    @property
    def num_reserved_blocks(self) -> int:
        return sum(self._reserved.values())

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for request in self.running:
            if budget == 0:
                break
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            self._grow(request, request.num_computed_tokens + num_tokens)
            chunks.append(ScheduledChunk(request, num_tokens))
            budget -= num_tokens
        admitted_for_kv, rejected = [], []
        while self.waiting and budget > 0 and self._num_active() < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._worst_case_blocks(request) > self.pool.num_blocks:
                rejected.append(self._reject(self.waiting.popleft()))
                continue
            if not self._admit(request):
                break  # first come, first served: the head waits for blocks
            self.waiting.popleft()
            if self.config.kv_from_remote:
                request.status = RequestStatus.WAITING_FOR_KV
                self.waiting_for_kv[request.request_id] = request
                admitted_for_kv.append(request)
                continue
            request.status = RequestStatus.RUNNING
            request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            chunks.append(ScheduledChunk(request, num_tokens))
            budget -= num_tokens
        return SchedulerOutput(chunks, admitted_for_kv, rejected)

    def _num_active(self) -> int:
        return len(self.running) + len(self.waiting_for_kv)

    def _worst_case_blocks(self, request: Request) -> int:
        """Blocks the request holds at most: every token whose KV is ever computed."""
        last_token = request.num_prompt_tokens + request.sampling.max_tokens - 1
        return cdiv(min(last_token, self.config.max_model_len), self.config.block_size)

    def _admit(self, request: Request) -> bool:
        """Takes prompt blocks (prefix hits first) and reserves the rest; False if they don't fit."""
        hits = [] if self.config.kv_from_remote else self._match_prefix(request)
        num_prompt_blocks = cdiv(request.num_prompt_tokens, self.config.block_size)
        num_new = num_prompt_blocks - len(hits)
        num_growth = self._worst_case_blocks(request) - num_prompt_blocks
        if self.pool.num_free_blocks - self.num_reserved_blocks < num_new + num_growth:
            self.pool.free(hits)
            return False
        request.block_ids = hits + self.pool.allocate(num_new)
        request.num_cached_tokens = len(hits) * self.config.block_size
        request.num_computed_tokens = request.num_cached_tokens
        self._reserved[request.request_id] = max(num_growth, 0)
        return True

    def _match_prefix(self, request: Request) -> list[int]:
        hashes = prefix_block_hashes(request.prompt_token_ids, self.config.block_size)
        hits = self.pool.match_prefix(hashes)
        if len(hits) * self.config.block_size >= request.num_prompt_tokens:
            self.pool.free(hits[-1:])  # the last token must run to give logits
            hits = hits[:-1]
        return hits

    def _grow(self, request: Request, num_tokens: int) -> None:
        num_new = cdiv(num_tokens, self.config.block_size) - len(request.block_ids)
        if num_new > 0:
            request.block_ids += self.pool.allocate(num_new)
            self._reserved[request.request_id] -= num_new

    def _reject(self, request: Request) -> Request:
        request.status = RequestStatus.FINISHED_ERROR
        request.error = (f"request needs {self._worst_case_blocks(request)} KV blocks, the pool has "
                         f"{self.pool.num_blocks}")
        return request

    # update
    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advances computed counts, caches full prompt blocks, appends sampled tokens.

        Returns the requests that finished this step (already removed from running; their blocks
        are still held: call `free_blocks`).
        """
        finished = []
        for request, num_tokens in output.chunks:
            request.num_computed_tokens += num_tokens
            if not self.config.kv_from_remote:
                self._cache_prompt_blocks(request)
            token_id = sampled.get(request.request_id)
            if token_id is not None and self.append_token(request, token_id):
                finished.append(request)
        return finished

    def _cache_prompt_blocks(self, request: Request) -> None:
        num_full = min(request.num_computed_tokens, request.num_prompt_tokens) // self.config.block_size
        if num_full * self.config.block_size <= request.num_cached_tokens:
            return
        hashes = prefix_block_hashes(request.prompt_token_ids[:num_full * self.config.block_size],
                                     self.config.block_size)
        for block_id, block_hash in zip(request.block_ids, hashes):
            self.pool.cache_block(block_id, block_hash)

    def append_token(self, request: Request, token_id: int) -> bool:
        """Appends a sampled token; finishes the request (True) on a stop condition."""
        request.output_token_ids.append(token_id)
        sampling = request.sampling
        if token_id in sampling.stop_token_ids or (
                not sampling.ignore_eos and token_id in self.eos_token_ids):
            self.finish(request, RequestStatus.FINISHED_STOPPED)
        elif (request.num_output_tokens >= sampling.max_tokens
              or request.num_tokens >= self.config.max_model_len):
            self.finish(request, RequestStatus.FINISHED_LENGTH)
        return request.status.finished

    # decode tier: KV arrival
    def kv_arrived(self, request_id: str, first_token_id: int) -> Request | None:
        """The prompt's KV is in the request's blocks: it joins the running batch.

        Returns the request, or None if it is no longer waiting (aborted meanwhile). A first
        token that ends the request finishes it at once (check `status.finished`).
        """
        request = self.waiting_for_kv.pop(request_id, None)
        if request is None:
            return None
        request.num_computed_tokens = request.num_prompt_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.append_token(request, first_token_id)
        return request

    # finishing
    def finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        """Marks a request finished and drops it from every queue; blocks stay held."""
        request.status = status
        request.error = error
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.waiting_for_kv.pop(request.request_id, None)
        self._reserved.pop(request.request_id, None)

    def free_blocks(self, request: Request) -> None:
        """Returns the request's blocks to the pool. Call once, after it finished."""
        self.pool.free(request.block_ids)
        request.block_ids = []
