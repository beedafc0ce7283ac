"""Receiver-side leases: the blocks a decode instance set aside for one incoming transfer.

    create() -> PENDING --begin--> RECEIVING --complete--> COMPLETE
                   |                   |
                   '-------------------'--> FAILED  (abort, bad data, stream gone, close(), expiry)

A lease never frees blocks itself: the request that owns them does, whatever the outcome. What
the lease guarantees is that once it is no longer RECEIVING, nothing writes to its blocks, so the
owner can free them safely. All methods run on the receiver's event loop (no locks needed).

On CUDA the writes go through a stream of their own. A host -> device copy on the engine's
(legacy default) stream first waits for every kernel already queued there, i.e. for the decode
step in flight, so each message of a transfer waited behind a step (an 8B model's transfers
took 65 ms at 1 request/s and 140 ms median, 1.4 s p99, at 4 requests/s on an H200, most of
the time to first token). On a side stream a message waits only for its own copy. Nothing else
needs ordering: each write returns when its copy is done (the source is pageable host memory,
so `copy_` synchronises its stream), the engine reads the blocks only after the lease is
COMPLETE, and blocks are leased only after the steps that used them before have ended.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.errors import InvalidRequestError, NotFoundError, PreconditionError
from engine.kv_cache import KVLayout
from engine.sampling_params import TokenLogprobs
from kvtransfer.segments import segment_layers, write_segment
from protos.tandem.v1 import kv_transfer_pb2

# Bumped only for a change an older peer would misread. Fields added to a message that an
# older receiver may ignore (first_token_logprobs, prompt_logprobs) keep the version: the
# receiver that needs one checks for it (the decode engine fails a request that asked for
# logprobs or prompt logprobs when the sender sent none). The same holds for the
# FirstTokenEarly message: a sender sends it only to a receiver that asked for it
# (KvDestination.first_token_early), so neither an older sender nor an older receiver meets it.
CONTRACT_VERSION = kv_transfer_pb2.KV_CONTRACT_VERSION_1


class LeaseState(enum.Enum):
    PENDING = "pending"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(slots=True, eq=False)
class Lease:
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    expires_at: float
    state: LeaseState = LeaseState.PENDING
    first_token_id: int | None = None
    first_token_logprobs: TokenLogprobs | None = None  # None: the sender sent none
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # one per prompt token after the first
    bytes_received: int = 0
    num_segments: int = 0
    started_at: float | None = None
    completed_at: float | None = None
    failure: str | None = None
    # the first token as sent ahead of the last blocks (FirstTokenEarly), and who is told of it
    early_first_token: int | None = None
    on_first_token: Callable[[int], None] | None = None
    _layers_seen: dict[int, set[int]] = field(default_factory=dict)

    @property
    def transfer_s(self) -> float:
        if self.started_at is None or self.completed_at is None:
            return 0.0
        return self.completed_at - self.started_at

    def fail(self, reason: str) -> None:
        if self.state in (LeaseState.PENDING, LeaseState.RECEIVING):
            self.state = LeaseState.FAILED
            self.failure = reason


class LeaseTable:
    """transfer_id -> Lease for one receiver, writing into its KV cache."""

    def __init__(self, layout: KVLayout, kv_cache: torch.Tensor):
        self.layout = layout
        self.kv_cache = kv_cache
        self._leases: dict[str, Lease] = {}
        # writes do not queue behind the engine's kernels (module docstring)
        self.stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self.num_expired = 0  # leases that expired under a transfer (a metric; only ever grows)

    def __len__(self) -> int:
        return len(self._leases)

    def create(self, transfer_id: str, block_ids: list[int], num_tokens: int,
               timeout_s: float) -> Lease:
        expected = -(-num_tokens // self.layout.block_size)
        if len(block_ids) < expected:
            raise ValueError(f"{num_tokens} tokens need {expected} blocks, got {len(block_ids)}")
        lease = Lease(transfer_id, list(block_ids[:expected]), num_tokens,
                      time.monotonic() + timeout_s)
        self._leases[transfer_id] = lease
        return lease

    def close(self, transfer_id: str, reason: str = "closed by the receiver") -> Lease | None:
        """Ends the lease (FAILED unless COMPLETE) and forgets it; writes stop at once."""
        lease = self._leases.pop(transfer_id, None)
        if lease is not None:
            lease.fail(reason)
        return lease

    def begin(self, begin: kv_transfer_pb2.TransferBegin) -> Lease:
        lease = self._leases.get(begin.transfer_id)
        if lease is None or lease.state is not LeaseState.PENDING:
            raise NotFoundError(f"no pending KV lease {begin.transfer_id!r} (expired, cancelled "
                                "or already used)")
        if time.monotonic() > lease.expires_at:
            raise self._expire(lease, "before the transfer began")
        problem = self._check_begin(begin, lease)
        if problem:
            lease.fail(problem)
            raise PreconditionError(problem)
        lease.state = LeaseState.RECEIVING
        return lease

    def _check_begin(self, begin: kv_transfer_pb2.TransferBegin, lease: Lease) -> str | None:
        if begin.version != CONTRACT_VERSION:
            return f"KV contract version {begin.version} unsupported (want {CONTRACT_VERSION})"
        mismatch = self.layout.mismatch(KVLayout.from_pb(begin.layout))
        if mismatch:
            return mismatch
        if begin.num_tokens != lease.num_tokens:
            return f"transfer has {begin.num_tokens} tokens, lease expects {lease.num_tokens}"
        return None

    def write(self, lease: Lease, batch: kv_transfer_pb2.KvBlockBatch) -> None:
        """Writes a batch into the lease's blocks. Raises if the lease is closed or data is bad."""
        self._check_open(lease)
        if lease.started_at is None:
            lease.started_at = time.monotonic()  # transfer time counts from the first KV byte
        with torch.cuda.stream(self.stream):  # None (CPU): a no-op
            self._write(lease, batch)

    def _write(self, lease: Lease, batch: kv_transfer_pb2.KvBlockBatch) -> None:
        for segment in batch.segments:
            if segment.block_index >= len(lease.block_ids):
                raise InvalidRequestError(f"block index {segment.block_index} beyond the "
                                          f"{len(lease.block_ids)} leased blocks")
            new = set(segment_layers(self.layout, segment))
            layers = lease._layers_seen.setdefault(segment.block_index, set())
            if layers & new:
                raise InvalidRequestError(f"block {segment.block_index} layers sent twice")
            write_segment(self.kv_cache, self.layout, lease.block_ids[segment.block_index], segment)
            layers |= new
            lease.bytes_received += len(segment.data)
            lease.num_segments += 1

    def first_token(self, lease: Lease, early: kv_transfer_pb2.FirstTokenEarly) -> None:
        """The first token, sent ahead of the last blocks: recorded, and handed to the lease's
        `on_first_token` (which must not raise: the transfer goes on either way)."""
        self._check_open(lease)
        if lease.early_first_token is not None:
            raise InvalidRequestError("first_token sent twice")
        lease.early_first_token = early.token_id
        if lease.on_first_token is not None:
            lease.on_first_token(early.token_id)

    def complete(self, lease: Lease, complete: kv_transfer_pb2.TransferComplete) -> None:
        self._check_open(lease)
        if lease.early_first_token not in (None, complete.first_token_id):
            raise InvalidRequestError(f"TransferComplete's first token {complete.first_token_id} "
                                      f"is not the one sent early ({lease.early_first_token})")
        num_layers = self.layout.num_layers
        missing = [i for i in range(len(lease.block_ids))
                   if len(lease._layers_seen.get(i, ())) != num_layers]
        if missing or complete.num_segments != lease.num_segments:
            raise PreconditionError(f"transfer incomplete: blocks {missing[:8]} missing, "
                                    f"{lease.num_segments}/{complete.num_segments} segments")
        lease.first_token_id = complete.first_token_id
        if complete.HasField("first_token_logprobs"):
            lease.first_token_logprobs = TokenLogprobs.from_pb(complete.first_token_logprobs)
        lease.prompt_logprobs = tuple(map(TokenLogprobs.from_pb, complete.prompt_logprobs))
        lease.state = LeaseState.COMPLETE
        lease.completed_at = time.monotonic()

    def _check_open(self, lease: Lease) -> None:
        if lease.state is not LeaseState.RECEIVING or lease.transfer_id not in self._leases:
            raise NotFoundError(f"KV lease {lease.transfer_id!r} is {lease.state.value}: "
                                f"{lease.failure or 'closed'}")
        if time.monotonic() > lease.expires_at:
            raise self._expire(lease, "during the transfer")

    def _expire(self, lease: Lease, when: str) -> NotFoundError:
        """Fails an expired lease, counts it, and returns the error to raise."""
        lease.fail(f"lease expired {when}")
        self.num_expired += 1
        return NotFoundError(f"KV lease {lease.transfer_id!r} expired")
