"""tandem.v1.KvTransfer: the decode instance's data-path endpoint."""

from __future__ import annotations

import asyncio
import logging

import grpc

from engine.errors import InvalidRequestError, TandemError
from engine.grpc_server import map_errors
from kvtransfer.lease import Lease, LeaseTable
from kvtransfer.wire import BlocksView, decode_push_message
from protos.tandem.v1 import kv_transfer_pb2

SERVICE_NAME = "tandem.v1.KvTransfer"


def add_kv_transfer_servicer(servicer: "KvTransferServicer", server: grpc.aio.Server) -> None:
    """Registers PushBlocks with a deserializer that leaves block payloads uncopied."""
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "PushBlocks": grpc.stream_unary_rpc_method_handler(
            servicer.PushBlocks, request_deserializer=decode_push_message,
            response_serializer=kv_transfer_pb2.KvPushResult.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))

logger = logging.getLogger("kvtransfer")


class KvTransferServicer:
    """One PushBlocks stream per transfer; every message is applied as it arrives, so memory in
    flight is bounded by gRPC flow control and one message."""

    def __init__(self, leases: LeaseTable):
        self.leases = leases

    @map_errors
    async def PushBlocks(self, request_iterator, context) -> kv_transfer_pb2.KvPushResult:
        lease: Lease | None = None
        try:
            async for message in request_iterator:
                kind = "blocks" if isinstance(message, BlocksView) else message.WhichOneof("kind")
                if kind == "begin":
                    if lease is not None:
                        raise InvalidRequestError("begin sent twice")
                    lease = self.leases.begin(message.begin)
                    continue
                if lease is None:
                    raise InvalidRequestError(f"first message must be begin, got {kind}")
                if kind == "blocks":
                    self.leases.write(lease, message if isinstance(message, BlocksView) else message.blocks)
                elif kind == "complete":
                    self.leases.complete(lease, message.complete)
                    return kv_transfer_pb2.KvPushResult(
                        status=kv_transfer_pb2.TRANSFER_STATUS_COMPLETE,
                        bytes_received=lease.bytes_received)
                elif kind == "first_token":
                    self.leases.first_token(lease, message.first_token)
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
