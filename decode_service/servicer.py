"""tandem.v1.Decode: protobuf in, DecodeEngine, protobuf out."""

from __future__ import annotations

from engine.grpc_server import map_errors
from engine.sampling_params import SamplingParams
from decode_service.engine import DecodeEngine
from protos.tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, generation_pb2

FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: DecodeEngine):
        self.engine = engine

    @map_errors
    async def Generate(self, request: decode_pb2.DecodeRequest, context):
        outputs = self.engine.generate(
            request.request_id, list(request.prompt_token_ids),
            SamplingParams.from_pb(request.sampling), list(request.prefill_addresses),
            context.time_remaining(), n=request.n or 1)
        async for output, stream in outputs:
            message = generation_pb2.GenerateResponse(request_id=request.request_id,
                                                      token_ids=output.token_ids, text=output.text,
                                                      logprobs=[e.to_pb() for e in output.logprobs],
                                                      prompt_logprobs=[e.to_pb() for e in
                                                                       output.prompt_logprobs],
                                                      index=output.index)
            if output.finish_reason is not None:
                message.finish_reason = FINISH_REASONS[output.finish_reason]
                message.usage.CopyFrom(stream.usage_pb())
                root = stream.root or stream
                if not root.num_open:  # the request's last message
                    message.timings.CopyFrom(root.timings_pb())
            yield message
