"""The sending side: `OutgoingTransfer` (one request's blocks as they become ready) and the
`KvTransport` interface with its gRPC/TCP implementation.

A transport moves the blocks named by an OutgoingTransfer into the lease named by a
KvDestination. `GrpcKvTransport` copies them through host memory over one PushBlocks stream; a
same-host GPU transport (CUDA IPC, NVLink) implements the same `push` and skips the copies.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple, Protocol

import grpc
import torch

from engine.errors import PreconditionError
from engine.grpc_server import error_from_rpc
from engine.kv_cache import KVLayout
from engine.sampling_params import TokenLogprobs
from kvtransfer.lease import CONTRACT_VERSION
from kvtransfer.segments import DEFAULT_MAX_MESSAGE_BYTES, plan_messages
from kvtransfer.wire import encode_blocks_message, encode_push_message
from protos.tandem.v1 import kv_transfer_pb2

logger = logging.getLogger("kvtransfer")

_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 16 * 2**20),
                    ("grpc.max_receive_message_length", 16 * 2**20)]


PUSH_BLOCKS_METHOD = "/tandem.v1.KvTransfer/PushBlocks"


class KvDestination(NamedTuple):
    transfer_id: str
    address: str
    layout: KVLayout
    # the receiver takes the first token ahead of the last blocks (FirstTokenEarly)
    first_token_early: bool = False


class PushReport(NamedTuple):
    bytes_sent: int


class FirstToken(NamedTuple):
    """What the prefill engine sends with the last block: the first token, its logprobs and the
    prompt's (each None unless the request asked)."""

    token_id: int
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None


class OutgoingTransfer:
    """One request's KV as the prefill engine completes it. Event-loop side only.

    The engine reports progress with `on_progress` (via loop.call_soon_threadsafe); the transport
    pulls block ids with `next_blocks`. Blocks are read only when sent: nothing is copied ahead.

    On CUDA each report carries an event recorded on the engine's stream after the step that
    completed the blocks (`ready_event`): the transport's reads wait for it, on a stream of their
    own, instead of for every kernel queued on the engine's stream (the next requests' prefill).
    """

    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens
        self.first: FirstToken | None = None
        self._ready: list[int] = []
        self._shipped = 0
        self._error: BaseException | None = None
        self._changed = asyncio.Event()
        # recorded after the engine step that completed the latest reported blocks (CUDA)
        self.ready_event: torch.cuda.Event | None = None

    @property
    def first_token_id(self) -> int | None:
        return None if self.first is None else self.first.token_id

    def on_progress(self, ready_block_ids: list[int], first: FirstToken | None = None,
                    error: BaseException | None = None,
                    ready_event: torch.cuda.Event | None = None) -> None:
        """ready_block_ids: the request's blocks complete so far, in order (a growing prefix);
        `first` once the first token is sampled (the last blocks are then ready); ready_event:
        done once the kernels that computed them are (CUDA; None: nothing to wait for)."""
        self._ready = ready_block_ids
        if ready_event is not None:
            self.ready_event = ready_event
        if first is not None:
            self.first = first
        if error is not None:
            self._error = error
        self._changed.set()

    async def next_blocks(self, limit: int) -> list[tuple[int, int]] | None:
        """Up to `limit` new (block_index, block_id) pairs; None once all are sent and the first
        token is known. Raises the engine's error if the computation failed."""
        while True:
            if self._error is not None:
                raise self._error
            if self._shipped < len(self._ready):
                end = min(len(self._ready), self._shipped + limit)
                pairs = [(i, self._ready[i]) for i in range(self._shipped, end)]
                self._shipped = end
                return pairs
            if self.first is not None:
                return None
            self._changed.clear()
            await self._changed.wait()


def complete_message(first: FirstToken, num_segments: int) -> kv_transfer_pb2.TransferComplete:
    """The transfer's last message: the first token (with its logprobs and the prompt's when the
    request asked) and the segment count."""
    complete = kv_transfer_pb2.TransferComplete(first_token_id=first.token_id,
                                                num_segments=num_segments)
    if first.logprobs is not None:
        complete.first_token_logprobs.CopyFrom(first.logprobs.to_pb())
    if first.prompt_logprobs is not None:
        complete.prompt_logprobs.extend(e.to_pb() for e in first.prompt_logprobs)
    return complete


class KvTransport(Protocol):
    async def push(self, destination: KvDestination, transfer: OutgoingTransfer,
                   timeout_s: float | None) -> PushReport:
        """Sends every block of `transfer` and its first token; returns once the receiver
        acknowledged. Raises a TandemError on failure; cancellation aborts the transfer."""
        ...

    async def close(self) -> None:
        ...


class GrpcKvTransport:
    """KvTransport over gRPC/TCP: works across hosts. On CUDA the blocks are read on a stream of
    the transport's own, after the transfer's `ready_event` (see OutgoingTransfer)."""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, instance_id: str,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.kv_cache = kv_cache
        self.layout = layout
        self.instance_id = instance_id
        self.max_message_bytes = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None

    def _push_blocks(self, address: str):
        """PushBlocks whose request serializer passes pre-encoded block messages through."""
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel.stream_unary(PUSH_BLOCKS_METHOD, request_serializer=encode_push_message,
                                    response_deserializer=kv_transfer_pb2.KvPushResult.FromString)

    async def push(self, destination: KvDestination, transfer: OutgoingTransfer,
                   timeout_s: float | None) -> PushReport:
        mismatch = self.layout.mismatch(destination.layout)
        if mismatch:
            raise PreconditionError(mismatch)
        call = self._push_blocks(destination.address)(timeout=timeout_s)
        bytes_sent = 0
        try:
            bytes_sent = await self._send_all(call, destination, transfer)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            pass  # the receiver ended the stream early; the call's final status says why
        except BaseException:
            call.cancel()
            raise
        try:
            result = await call
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"KV transfer to {destination.address}") from None
        if result.status != kv_transfer_pb2.TRANSFER_STATUS_COMPLETE:
            raise PreconditionError(f"receiver rejected transfer: {result.message}")
        return PushReport(bytes_sent)

    async def _send_all(self, call, destination: KvDestination, transfer: OutgoingTransfer) -> int:
        await call.write(kv_transfer_pb2.KvPushMessage(begin=kv_transfer_pb2.TransferBegin(
            version=CONTRACT_VERSION, transfer_id=destination.transfer_id,
            layout=self.layout.to_pb(), num_tokens=transfer.num_tokens,
            source_instance_id=self.instance_id)))
        limit = max(1, 4 * self.max_message_bytes // self.layout.bytes_per_block)
        num_bytes = num_segments = 0
        early = destination.first_token_early
        while (blocks := await transfer.next_blocks(limit)) is not None:
            if early and transfer.first is not None:  # ahead of the blocks still to send
                early = False
                await call.write(kv_transfer_pb2.KvPushMessage(
                    first_token=kv_transfer_pb2.FirstTokenEarly(token_id=transfer.first.token_id)))
            plan = plan_messages(self.layout, blocks, self.max_message_bytes)
            async for message in self._encoded(plan, transfer.ready_event):
                await call.write(message)
            num_segments += sum(len(segments) for segments in plan)
            num_bytes += sum(n for segments in plan for *_, n in segments) * \
                self.layout.bytes_per_block_layer
        await call.write(kv_transfer_pb2.KvPushMessage(complete=complete_message(
            transfer.first, num_segments)))
        await call.done_writing()
        return num_bytes

    async def _encoded(self, plan: list, ready: torch.cuda.Event | None):
        """Encoded messages in order; the next one is copied out of the cache (in a worker
        thread) while the current one is written: at most two messages in memory."""
        def encode(segments):
            return asyncio.ensure_future(asyncio.to_thread(self._encode, segments, ready))

        upcoming = encode(plan[0]) if plan else None
        for i in range(len(plan)):
            current, upcoming = upcoming, encode(plan[i + 1]) if i + 1 < len(plan) else None
            try:
                yield await current
            except BaseException:
                if upcoming is not None:
                    upcoming.cancel()
                raise

    def _encode(self, segments: list, ready: torch.cuda.Event | None) -> bytes:
        """One message, read after `ready` on the transport's stream (CUDA); each copy to host
        memory returns when done."""
        if self.stream is None:
            return encode_blocks_message(self.kv_cache, self.layout, segments)
        with torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            return encode_blocks_message(self.kv_cache, self.layout, segments)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

