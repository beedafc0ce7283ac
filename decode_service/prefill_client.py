"""The decode tier's client for the prefill tier (one channel per prefill address)."""

from __future__ import annotations

import grpc

from engine.grpc_server import internal_error_from_rpc
from engine.kv_cache import KVLayout
from engine.request import Request
from protos.tandem.v1 import prefill_pb2, prefill_pb2_grpc


class PrefillClient:
    def __init__(self, kv_transfer_address: str):
        self.kv_transfer_address = kv_transfer_address
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return prefill_pb2_grpc.PrefillStub(self._channels[address])

    async def prefill(self, request: Request, transfer_id: str, address: str, layout: KVLayout,
                      timeout_s: float, first_token_early: bool = False
                      ) -> prefill_pb2.PrefillResponse:
        """Asks the prefill instance at `address` to compute `request`'s prompt and push its KV
        into this instance's lease `transfer_id` (with the first token ahead of the last blocks
        when `first_token_early`).

        Raises a TandemError: the prefill instance's status code (UNAVAILABLE when it cannot be
        reached or goes away), or INTERNAL where that code would blame the user for a fault
        between the tiers (`internal_error_from_rpc`)."""
        message = prefill_pb2.PrefillRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling.to_pb(),
            destination=prefill_pb2.KvDestination(transfer_id=transfer_id,
                                                  address=self.kv_transfer_address,
                                                  layout=layout.to_pb(),
                                                  first_token_early=first_token_early))
        try:
            return await self._stub(address).Prefill(message, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise internal_error_from_rpc(exc, f"prefill instance {address}") from None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
