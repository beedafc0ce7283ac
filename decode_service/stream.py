"""Per-request state on the decode tier that lives outside the scheduler: the output queue, the
detokenizer, the prefill leg and the phase timings."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.detokenizer import IncrementalDetokenizer
from engine.errors import TandemError
from engine.request import Request
from engine.sampling_params import TokenLogprobs
from protos.tandem.v1 import common_pb2


class DecodeOutput(NamedTuple):
    """One message for the client: new tokens and their text; the last one has finish_reason."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last message
    error: TandemError | None = None
    # one per token id when the request asked for logprobs (sampling.logprobs set), else empty
    logprobs: tuple[TokenLogprobs, ...] = ()
    # on the first output of a request that asked for prompt logprobs: one per prompt token
    # after the first
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    index: int = 0  # the branch (n > 1), set when it is delivered


@dataclass(slots=True, eq=False)
class RequestStream:
    """One branch of a request (n > 1 gives n, sharing one output queue). The prefill leg,
    its lease and the phase timings live on branch 0, the root, whose `branches` lists all."""

    request: Request
    detokenizer: IncrementalDetokenizer
    prefill_addresses: list[str]
    deadline: float | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    leg: asyncio.Task | None = None
    transfer_id: str | None = None  # the current prefill attempt's lease
    queued: bool = False  # counted in DecodeEngine's admission queue
    done: bool = False
    # timings (monotonic seconds)
    arrival: float = field(default_factory=time.monotonic)
    leg_started: float | None = None
    leg_deadline: float = 0.0  # when the current prefill attempt's KV must have arrived
    running_since: float | None = None
    first_output: float | None = None
    finished_at: float | None = None
    prefill_queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_bytes: int = 0
    transfer_s: float = 0.0
    num_cached_tokens: int = 0
    # the first token as the prefill tier sent it ahead of the KV (FirstTokenEarly), and whether
    # the client has it already (DecodeEngine._emit_early)
    early_first_token: int | None = None
    early_delivered: bool = False
    index: int = 0  # the branch
    root: RequestStream | None = None  # branch 0; None for branch 0 itself
    branches: list[RequestStream] = field(default_factory=list)  # root: every branch, in order
    num_open: int = 0  # root: branches without their last output yet (set by `branches`)

    def __post_init__(self) -> None:
        self.branches = [self]
        self.num_open = 1

    def set_branches(self, branches: list[RequestStream]) -> None:
        self.branches, self.num_open = branches, len(branches)

    @property
    def end(self) -> float:
        """When the request's last branch finished (now, while one runs)."""
        ends = [branch.finished_at for branch in self.branches]
        return time.monotonic() if None in ends else max(ends)

    def usage_pb(self) -> common_pb2.Usage:
        return common_pb2.Usage(prompt_tokens=self.request.num_prompt_tokens,
                                completion_tokens=self.request.num_output_tokens,
                                cached_prompt_tokens=self.num_cached_tokens)

    def timings_pb(self) -> common_pb2.PhaseTimings:
        """The request's phases (call on the root), draft counts summed over its branches."""
        end = self.end
        leg = self.leg_started or self.arrival
        return common_pb2.PhaseTimings(
            queue_s=leg - self.arrival, prefill_queue_s=self.prefill_queue_s,
            prefill_s=self.prefill_s, transfer_bytes=self.transfer_bytes,
            transfer_s=self.transfer_s,
            decode_s=end - self.running_since if self.running_since else 0.0,
            time_to_first_token_s=(self.first_output or end) - self.arrival,
            num_draft_tokens=sum(b.request.num_draft_tokens for b in self.branches),
            num_accepted_draft_tokens=sum(b.request.num_accepted_draft_tokens
                                          for b in self.branches))
