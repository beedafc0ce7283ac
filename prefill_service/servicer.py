"""tandem.v1.Prefill: protobuf in, PrefillEngine, protobuf out."""

from __future__ import annotations

from engine.grpc_server import map_errors
from engine.kv_cache import KVLayout
from engine.sampling_params import SamplingParams
from kvtransfer.sender import KvDestination
from prefill_service.engine import PrefillEngine
from protos.tandem.v1 import prefill_pb2, prefill_pb2_grpc


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine):
        self.engine = engine

    @map_errors
    async def Prefill(self, request: prefill_pb2.PrefillRequest, context) -> prefill_pb2.PrefillResponse:
        dest = request.destination
        destination = KvDestination(dest.transfer_id, dest.address, KVLayout.from_pb(dest.layout),
                                    dest.first_token_early)
        result = await self.engine.prefill(
            request.request_id, list(request.prompt_token_ids),
            SamplingParams.from_pb(request.sampling), destination, context.time_remaining())
        return prefill_pb2.PrefillResponse(
            first_token_id=result.first_token_id, num_cached_tokens=result.num_cached_tokens,
            queue_s=result.queue_s, compute_s=result.compute_s, bytes_sent=result.bytes_sent)
