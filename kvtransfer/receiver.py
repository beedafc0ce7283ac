"""tandem.v1.KvTransfer: the decode instance's data-path endpoint."""

from __future__ import annotations

import asyncio
import logging

from engine.errors import InvalidRequestError, TandemError
from engine.grpc_server import map_errors
from kvtransfer.lease import Lease, LeaseTable
from protos.tandem.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

logger = logging.getLogger("kvtransfer")


class KvTransferServicer(kv_transfer_pb2_grpc.KvTransferServicer):
    """One PushBlocks stream per transfer; every message is applied as it arrives, so memory in
    flight is bounded by gRPC flow control and one message."""

    def __init__(self, leases: LeaseTable):
        self.leases = leases

    @map_errors
    async def PushBlocks(self, request_iterator, context) -> kv_transfer_pb2.KvPushResult:
        lease: Lease | None = None
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "begin":
                    if lease is not None:
                        raise InvalidRequestError("begin sent twice")
                    lease = self.leases.begin(message.begin)
                    continue
                if lease is None:
                    raise InvalidRequestError(f"first message must be begin, got {kind}")
                if kind == "blocks":
                    self.leases.write(lease, message.blocks)
                elif kind == "complete":
                    self.leases.complete(lease, message.complete)
                    return kv_transfer_pb2.KvPushResult(
                        status=kv_transfer_pb2.TRANSFER_STATUS_COMPLETE,
                        bytes_received=lease.bytes_received)
                elif kind == "abort":
                    lease.fail(f"sender aborted: {message.abort.reason}")
                    return self._failed(lease)
                else:
                    raise InvalidRequestError("empty KvPushMessage")
            if lease is not None:
                lease.fail("sender closed the stream before complete")
                return self._failed(lease)
            raise InvalidRequestError("empty PushBlocks stream")
        except (TandemError, asyncio.CancelledError) as exc:
            if lease is not None:
                lease.fail(str(exc) or "peer went away")
            raise

    @staticmethod
    def _failed(lease: Lease) -> kv_transfer_pb2.KvPushResult:
        logger.info("transfer %s failed: %s", lease.transfer_id, lease.failure)
        return kv_transfer_pb2.KvPushResult(status=kv_transfer_pb2.TRANSFER_STATUS_FAILED,
                                            bytes_received=lease.bytes_received,
                                            message=lease.failure or "")
