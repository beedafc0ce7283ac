"""One token-budget scheduler for both tiers. It holds no tensors.

Each step: running requests first (FIFO), each given `num_tokens - num_computed_tokens` tokens
(capped by what is left of the budget), then waiting requests are admitted while the pool can
hold them. A prompt therefore runs in chunks of at most `max_num_batched_tokens`; a decode
request needs one token a step.

Block accounting: admission takes the prompt's blocks and *reserves* the blocks the request may
still grow into (up to max_tokens or the context length); growth allocates from that
reservation, so a running request never finds the pool empty and nothing is ever preempted.
The pool holds at least one `max_model_len` sequence (checked at construction), so every
request fits once the requests before it finish: admission waits, it never refuses. The price
is conservative admission when max_tokens is large (docs/design.md); optimistic admission with
preemption replaces it later.

Prefix cache (tiers that compute their own KV): a prompt's full-block hashes are computed once,
when it first reaches the head of the queue; a block is registered in the cache once, when its
last token has been computed.

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


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """Owns the waiting queue, the running list and the block reservations (not thread-safe)."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool, eos_token_ids: frozenset[int]):
        if cdiv(config.max_model_len, config.block_size) > pool.num_blocks:
            raise ValueError(f"a {config.max_model_len}-token sequence needs "
                             f"{cdiv(config.max_model_len, config.block_size)} KV blocks; the pool "
                             f"has {pool.num_blocks}")
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

    @property
    def num_available_blocks(self) -> int:
        """Free blocks not promised to admitted requests: what a new request can take."""
        return self.pool.num_free_blocks - self.num_reserved_blocks

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
        admitted_for_kv = []
        while self.waiting and budget > 0 and self._num_active() < self.config.max_num_seqs:
            request = self.waiting[0]
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
        return SchedulerOutput(chunks, admitted_for_kv)

    def _num_active(self) -> int:
        return len(self.running) + len(self.waiting_for_kv)

    def _worst_case_blocks(self, request: Request) -> int:
        """Blocks the request holds at most: every token whose KV is ever computed."""
        last_token = request.num_prompt_tokens + request.sampling.max_tokens - 1
        return cdiv(min(last_token, self.config.max_model_len), self.config.block_size)

    def _admit(self, request: Request) -> bool:
        """Takes prompt blocks (prefix hits first) and reserves the rest; False (nothing taken,
        nothing counted) if they don't fit yet."""
        hits = self._prefix_hits(request)
        num_prompt_blocks = cdiv(request.num_prompt_tokens, self.config.block_size)
        num_new = num_prompt_blocks - len(hits)
        num_growth = self._worst_case_blocks(request) - num_prompt_blocks
        num_free_hits = sum(self.pool.ref_count(b) == 0 for b in hits)  # hits are free blocks too
        if self.num_available_blocks - num_free_hits < num_new + num_growth:
            return False
        if self.pool.enable_prefix_cache and request.block_hashes is not None:
            hits = self.pool.match_prefix(request.block_hashes[:len(hits)],
                                          num_queried=len(request.block_hashes))
        request.block_ids = hits + self.pool.allocate(num_new)
        request.num_cached_tokens = len(hits) * self.config.block_size
        request.num_computed_tokens = request.num_cached_tokens
        request.num_registered_blocks = len(hits)
        self._reserved[request.request_id] = max(num_growth, 0)
        return True

    def _prefix_hits(self, request: Request) -> list[int]:
        """Cached blocks the prompt could reuse (looked up, not taken): never all of the prompt,
        since its last token must run to give logits."""
        if self.config.kv_from_remote or not self.pool.enable_prefix_cache:
            return []
        if request.block_hashes is None:
            request.block_hashes = prefix_block_hashes(request.prompt_token_ids,
                                                       self.config.block_size)
        hits = self.pool.lookup_prefix(request.block_hashes)
        if len(hits) * self.config.block_size >= request.num_prompt_tokens:
            hits = hits[:-1]
        return hits

    def _grow(self, request: Request, num_tokens: int) -> None:
        num_new = cdiv(num_tokens, self.config.block_size) - len(request.block_ids)
        if num_new > 0:
            request.block_ids += self.pool.allocate(num_new)
            self._reserved[request.request_id] -= num_new

    # update
    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advances computed counts, caches full prompt blocks, appends sampled tokens.

        Returns the requests that finished this step (already removed from running; their blocks
        are still held: call `free_blocks`).
        """
        finished = []
        for request, num_tokens in output.chunks:
            if request.status.finished:  # failed during the step (e.g. its sampling)
                continue
            request.num_computed_tokens += num_tokens
            if request.block_hashes is not None:
                self._cache_prompt_blocks(request)
            token_id = sampled.get(request.request_id)
            if token_id is not None and self.append_token(request, token_id):
                finished.append(request)
        return finished

    def _cache_prompt_blocks(self, request: Request) -> None:
        """Registers the prompt blocks completed since the last call (each one once)."""
        num_full = min(request.num_computed_tokens, request.num_prompt_tokens) // self.config.block_size
        for i in range(request.num_registered_blocks, num_full):
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(num_full, request.num_registered_blocks)

    def append_token(self, request: Request, token_id: int) -> bool:
        """Appends a sampled token; finishes the request (True) on a stop condition.

        EOS and stop_token_ids end the request only from output token `sampling.min_tokens + 1`
        on, as in vLLM. vLLM masks their logits until then; here the model may still pick one,
        and it stays in the output as an ordinary token (as with ignore_eos)."""
        request.output_token_ids.append(token_id)
        sampling = request.sampling
        may_stop = request.num_output_tokens > sampling.min_tokens
        if may_stop and (token_id in sampling.stop_token_ids or (
                not sampling.ignore_eos and token_id in self.eos_token_ids)):
            request.stop_token_id = token_id
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
        request.finished_time = time.monotonic()
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
