"""One token-budget scheduler for both tiers. It holds no tensors.

Each step: running requests first (FIFO), each given `num_tokens - num_computed_tokens` tokens
(capped by what is left of the budget), then waiting requests are admitted while the pool can
hold them. A prompt therefore runs in chunks of at most `max_num_batched_tokens`; a decode
request needs one token a step.

Block accounting (optimistic, as vLLM): admission takes the blocks of the request's tokens so
far (prefix hits first) and nothing more, keeping a small watermark free while other requests
run; a running request takes a block whenever its next tokens need one. When the pool is empty
at that moment, the NEWEST running request is preempted (repeatedly, until the growth fits; it
may be the growing request itself): its blocks go back to the pool, its computed count to 0,
and it returns to the head of the waiting queue with its output tokens kept. Re-admitted, it is
recomputed locally, prompt and output tokens in chunks like a prompt (on the decode tier too:
it skips the KV transfer), and the step that completes it samples its next token, at the same
position, so a seeded request draws exactly the token it would have drawn; its stream just
pauses. Older requests always progress: the oldest running request is never preempted for a
newer one, and the pool holds at least one `max_model_len` sequence (checked at construction),
so admission waits and never refuses a request for its size.

Speculative decoding: a decoding request may carry draft tokens (`spec_token_ids`, set by the
decode tier before `schedule`); it is then given its last token plus the drafts (trimmed to the
budget, to max_tokens and to the context), blocks included. `update_from_output` takes the
verified tokens (decode_service/speculative.py: the accepted drafts, then one more): only the
KV of the last token and of the accepted drafts counts as computed, and blocks taken only for
rejected drafts go back to the pool. Drafts never reach the prefix cache (it holds prompt
blocks only).

Prefix cache (tiers that compute their own KV): a prompt's full-block hashes are computed once,
when it first reaches the head of the queue; a block is registered in the cache once, when its
last token has been computed. A request that asked for prompt logprobs takes no hits (each of
its positions must run), but its blocks are registered as any other's.

On the decode tier (`kv_from_remote`), admission of a new request does not schedule compute: it
moves to WAITING_FOR_KV and is reported in `SchedulerOutput.admitted_for_kv`; the engine starts
its KV transfer and calls `kv_arrived` when the blocks are filled. Requests waiting for KV are
never preempted (their blocks are leased to a transfer).

n > 1 (decode tier): the request's other branches wait in `request.forks`, counted at admission
(a seat and a block each); when its KV arrives they join the running batch behind it, sharing
the prompt blocks that end before its last token (`_fork`; docs/design.md has the picture).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from engine.block_pool import BlockPool, prefix_block_hashes
from engine.request import Request, RequestStatus

logger = logging.getLogger("engine")

# While other requests run, admission leaves this fraction of the pool free (at least one block),
# so that a request admitted now does not preempt a running one at its next block.
WATERMARK_FRACTION = 0.01


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
    preempted: Sequence[Request] = ()  # blocks taken back this step; waiting again, at the head


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """Owns the waiting queue, the running list and their blocks (not thread-safe)."""

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
        self.watermark_blocks = max(1, int(pool.num_blocks * WATERMARK_FRACTION))
        self.num_preemptions = 0  # since start (metrics)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        num_scheduled = 0  # self.running[:num_scheduled] have their chunk this step
        while num_scheduled < len(self.running) and budget > 0:
            request = self.running[num_scheduled]
            num_tokens = self._num_new_tokens(request, budget)
            while not self._grow(request, request.num_computed_tokens + num_tokens):
                victim = self.running.pop()  # the newest; never one scheduled already
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                chunks.append(ScheduledChunk(request, num_tokens))
                budget -= num_tokens
                num_scheduled += 1
        self.waiting.extendleft(preempted)  # newest first in, so the oldest ends at the head
        admitted_for_kv = []
        while self.waiting and budget > 0 and not preempted:
            request = self.waiting[0]
            if (self._num_active() + 1 + len(request.forks) > self.config.max_num_seqs
                    or not self._admit(request)):
                break  # first come, first served: the head waits for seats and blocks
            self.waiting.popleft()
            if (self.config.kv_from_remote and not request.output_token_ids
                    and not request.num_preemptions):
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
        return SchedulerOutput(chunks, admitted_for_kv, preempted)

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        """The tokens a running request computes this step: those it lacks, then, when it is
        decoding (it lacks only its last token), its draft tokens, trimmed to the budget and
        to what max_tokens and the context leave (a step outputs at most drafts + 1)."""
        behind = request.num_tokens - request.num_computed_tokens
        if request.spec_token_ids:
            room = min(budget - behind,
                       request.sampling.max_tokens - request.num_output_tokens - 1,
                       self.config.max_model_len - request.num_tokens - 1)
            del request.spec_token_ids[max(room, 0) if behind == 1 else 0:]
        return min(behind + len(request.spec_token_ids), budget)

    def _num_active(self) -> int:
        """Sequences running, or holding a seat while they wait for KV (with their forks)."""
        return len(self.running) + sum(1 + len(r.forks) for r in self.waiting_for_kv.values())

    def _admit(self, request: Request) -> bool:
        """Takes the blocks of the request's tokens so far (prefix hits first: of its prompt); False
        (nothing taken, nothing counted) if they don't fit yet. While others run, the watermark
        stays free as well; with forks, one more block for each (its own last block, taken
        when it forks), as far as the pool has them (so the request is admitted at the latest
        when the pool is empty; the forks that then lack a block are preempted and wait)."""
        hits = self._prefix_hits(request)
        num_new = cdiv(request.num_tokens, self.config.block_size) - len(hits)
        num_free_hits = sum(self.pool.ref_count(b) == 0 for b in hits)  # hits are free blocks too
        watermark = self.watermark_blocks if self._num_active() else 0
        num_needed = min(num_new + len(request.forks), self.pool.num_blocks)
        if self.pool.num_free_blocks - num_free_hits < num_needed + watermark:
            return False
        if self.pool.enable_prefix_cache and request.block_hashes is not None:
            hits = self.pool.match_prefix(request.block_hashes[:len(hits)],
                                          num_queried=len(request.block_hashes))
        request.block_ids = hits + self.pool.allocate(num_new)
        request.num_cached_tokens = len(hits) * self.config.block_size
        request.num_computed_tokens = request.num_cached_tokens
        request.num_registered_blocks = len(hits)
        return True

    def _prefix_hits(self, request: Request) -> list[int]:
        """Cached blocks the prompt could reuse (looked up, not taken): never all of the prompt,
        since its last token must run to give logits; none for a request that asked for prompt
        logprobs (every position must run to give them; its blocks still enter the cache)."""
        if self.config.kv_from_remote or not self.pool.enable_prefix_cache:
            return []
        if request.block_hashes is None:
            request.block_hashes = prefix_block_hashes(request.prompt_token_ids,
                                                       self.config.block_size)
        if request.sampling.prompt_logprobs is not None:
            return []
        hits = self.pool.lookup_prefix(request.block_hashes)
        if len(hits) * self.config.block_size >= request.num_prompt_tokens:
            hits = hits[:-1]
        return hits

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Gives the request blocks for its first `num_tokens` tokens; False (nothing taken) if
        the pool has too few free."""
        if num_tokens <= len(request.block_ids) * self.config.block_size:
            return True  # the common case: its blocks hold them already
        num_new = cdiv(num_tokens, self.config.block_size) - len(request.block_ids)
        if num_new > self.pool.num_free_blocks:
            return False
        if num_new > 0:
            request.block_ids += self.pool.allocate(num_new)
        return True

    def _preempt(self, request: Request) -> None:
        """Takes a running request's blocks back; it waits again, to be recomputed in full."""
        logger.info("preempting request %s (%d tokens, %d blocks): the KV pool is full; it "
                    "will be recomputed", request.request_id, request.num_tokens,
                    len(request.block_ids))
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.num_cached_tokens = 0
        request.num_registered_blocks = 0
        request.num_preemptions += 1
        request.spec_token_ids = []
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1

    # update
    def update_from_output(self, output: SchedulerOutput,
                           sampled: dict[str, int | list[int]]) -> list[Request]:
        """Advances computed counts, caches full prompt blocks, appends sampled tokens: one per
        request, or with drafts scored, the verified ones (the accepted drafts, then one more).

        With drafts, only the KV of the request's last token and of the accepted drafts counts
        as computed (the rejected drafts' slots are written again later), and blocks taken only
        for rejected drafts go back to the pool. Tokens after one that finishes the request are
        dropped (from `sampled` too: it then holds what was appended). Returns the requests
        that finished this step (already removed from running; their blocks are still held:
        call `free_blocks`).
        """
        finished = []
        for request, num_tokens in output.chunks:
            if request.status.finished:  # failed during the step (e.g. its sampling)
                continue
            taken = sampled.get(request.request_id)
            taken = [] if taken is None else [taken] if isinstance(taken, int) else taken
            num_spec = len(request.spec_token_ids)
            if num_spec:
                request.spec_token_ids = []
            if len(taken) > num_spec + 1:
                raise ValueError(f"request {request.request_id}: {len(taken)} tokens verified "
                                 f"for {num_spec} drafts")
            request.num_computed_tokens += num_tokens - num_spec + max(len(taken) - 1, 0)
            if (request.block_hashes is not None
                    and request.num_registered_blocks < len(request.block_hashes)):
                self._cache_prompt_blocks(request)  # not once all full prompt blocks are
            for num_appended, token_id in enumerate(taken, 1):
                if self.append_token(request, token_id):
                    finished.append(request)
                    if num_appended < len(taken):  # what the tier emits: the tokens appended
                        sampled[request.request_id] = taken[:num_appended]
                    break
            if num_spec and not request.status.finished:
                self._release_unused_blocks(request)
        return finished

    def _release_unused_blocks(self, request: Request) -> None:
        """Frees the blocks past the request's tokens (taken for drafts that were rejected)."""
        needed = cdiv(request.num_tokens, self.config.block_size)
        if len(request.block_ids) > needed:
            self.pool.free(request.block_ids[needed:])
            del request.block_ids[needed:]

    def _cache_prompt_blocks(self, request: Request) -> None:
        """Registers the prompt blocks completed since the last call (each one once)."""
        num_full = min(request.num_computed_tokens, request.num_prompt_tokens) // self.config.block_size
        for i in range(request.num_registered_blocks, num_full):
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(num_full, request.num_registered_blocks)

    def append_token(self, request: Request, token_id: int) -> bool:
        """Appends a sampled token; finishes the request (True) on a stop condition.

        EOS and stop_token_ids end the request only from output token `sampling.min_tokens + 1`
        on, as in vLLM. The sampler masks them until then (engine/logits_processors.py), so this
        check is a safety net: a token that got through anyway stays in the output as an
        ordinary token (as with ignore_eos)."""
        output = request.output_token_ids
        output.append(token_id)
        if request.grammar is not None and self._grammar_ended(request, token_id):
            return True
        sampling = request.sampling
        num_output = len(output)
        if num_output > sampling.min_tokens and (token_id in sampling.stop_token_ids or (
                not sampling.ignore_eos and token_id in self.eos_token_ids)):
            request.stop_token_id = token_id
            self.finish(request, RequestStatus.FINISHED_STOPPED)
        elif (num_output >= sampling.max_tokens
              or len(request.prompt_token_ids) + num_output >= self.config.max_model_len):
            self.finish(request, RequestStatus.FINISHED_LENGTH)
        return request.status.finished

    def _grammar_ended(self, request: Request, token_id: int) -> bool:
        """Advances the request's grammar matcher by its new token. A token the grammar does not
        allow (the sampler's mask prevents that) fails the request; one that terminates the
        grammar (a stop token once the grammar is complete) stops it."""
        if not request.grammar.accept_token(token_id):
            self.finish(request, RequestStatus.FINISHED_ERROR,
                        f"token {token_id} is not allowed by the request's grammar")
        elif request.grammar.is_terminated():
            if token_id in self.eos_token_ids or token_id in request.sampling.stop_token_ids:
                request.stop_token_id = token_id
            self.finish(request, RequestStatus.FINISHED_STOPPED)
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
        self._fork(request)
        self.append_token(request, first_token_id)
        return request

    def _fork(self, request: Request) -> None:
        """Starts the request's forks (its other branches, n > 1) behind it in the running
        batch. Each takes a reference on the prompt blocks that end before the prompt's last
        token (copy-on-write without a copy: those blocks are never written again) and
        computes the rest of the prompt itself, at most one block, into a block of its own in
        its next step, which samples its first token with its own seed. Forks aborted
        meanwhile (finished) are skipped."""
        block_size = self.config.block_size
        num_shared = (request.num_prompt_tokens - 1) // block_size
        shared = request.block_ids[:num_shared]
        now = time.monotonic()
        for fork in request.forks:
            if fork.status.finished:
                continue
            self.pool.share(shared)
            fork.block_ids = list(shared)
            fork.num_computed_tokens = num_shared * block_size
            fork.status = RequestStatus.RUNNING
            fork.first_scheduled_time = now
            self.running.append(fork)
        request.forks = []

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

    def free_blocks(self, request: Request) -> None:
        """Returns the request's blocks to the pool. Call once, after it finished."""
        self.pool.free(request.block_ids)
        request.block_ids = []
