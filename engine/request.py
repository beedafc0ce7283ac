"""A request as the engine sees it, and its states.

    prefill tier:  WAITING -> RUNNING (chunks) -> FINISHED_LENGTH (first token sampled)
    decode tier:   WAITING -> WAITING_FOR_KV -> RUNNING (one token a step) -> FINISHED_*
    preempted:     RUNNING -> WAITING (blocks freed) -> RUNNING (recomputed in chunks, locally)
    any state:     -> FINISHED_ABORTED (cancelled, peer gone) | FINISHED_ERROR

`num_computed_tokens` catches up with `num_tokens`: the scheduler hands out
`num_tokens - num_computed_tokens` tokens per step within a budget, which covers chunked
prefill, prefix hits (they start num_computed_tokens above 0) and decode alike.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from engine.sampling_params import SamplingParams, TokenLogprobs


class TokenGrammar(Protocol):
    """A request's grammar matcher (xgrammar's GrammarMatcher; engine/structured.py): the
    scheduler advances it with every token appended, the sampler asks it for the next mask."""

    def accept_token(self, token_id: int) -> bool: ...

    def is_terminated(self) -> bool: ...

    def fill_next_token_bitmask(self, bitmask: object, index: int) -> object: ...


class RequestStatus(enum.Enum):
    WAITING = "waiting"                # queued until the pool can hold it
    WAITING_FOR_KV = "waiting_for_kv"  # decode: blocks leased, prompt KV arriving from prefill
    RUNNING = "running"
    FINISHED_STOPPED = "stop"          # EOS, stop token or stop string
    FINISHED_LENGTH = "length"         # max_tokens or context length
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR}


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # prefix cache (tiers that compute their own KV): chained hashes of the prompt's full blocks,
    # computed once at the first admission attempt; the first num_registered_blocks of block_ids
    # are registered in the pool's cache (each block is hashed and registered once)
    block_hashes: list[bytes] | None = None
    num_registered_blocks: int = 0
    stop_token_id: int | None = None  # the EOS / stop token id that finished it, if one did
    num_preemptions: int = 0  # times its blocks were taken back and it was recomputed
    # speculative decoding: draft tokens proposed to follow the request's tokens this step; they
    # are scored (and their KV written) after num_tokens but are not output until verified
    spec_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # drafts scored so far (decode tier)
    num_accepted_draft_tokens: int = 0
    num_steps_since_draft: int = 0
    # sampling.prompt_logprobs set (prefill tier): entry i is prompt token i + 1's, filled as
    # the chunks run (`record_prompt_logprobs`)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # structured output: the matcher of SamplingParams.structured_output, at the state after
    # every token appended so far (None: unconstrained)
    grammar: TokenGrammar | None = None
    # decode tier, n > 1: the other branches of this request, not yet scheduled; they join the
    # running batch when its prompt's KV arrives (Scheduler.kv_arrived), sharing its full blocks
    forks: list[Request] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    finished_time: float | None = None
    error: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output + spec_token_ids (the drafts being scored)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if num_prompt <= start and end <= num_prompt + len(self.output_token_ids):
            return self.output_token_ids[start - num_prompt:end - num_prompt]  # decoding
        out_start, out_end = max(start - num_prompt, 0), end - num_prompt
        head = self.prompt_token_ids[start:num_prompt] if start < num_prompt else []
        tail = (self.output_token_ids + self.spec_token_ids) if end > self.num_tokens \
            else self.output_token_ids
        return head + tail[out_start:out_end]

    def record_prompt_logprobs(self, start: int, entries: list[TokenLogprobs]) -> None:
        """The prompt logprobs of the chunk at positions [start, ...): those of prompt tokens
        start + 1, .... A recomputed chunk (after a preemption) replaces what it had given."""
        del self.prompt_logprobs[start:]
        self.prompt_logprobs.extend(entries)

    def slot(self, position: int, block_size: int) -> int:
        """Flat KV slot of the token at `position` (its block must be allocated)."""
        return self.block_ids[position // block_size] * block_size + position % block_size
