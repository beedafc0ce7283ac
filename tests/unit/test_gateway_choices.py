"""gateway.choices over real gRPC decode stand-ins: n branches end one ABORT message each when
the gateway shuts down under them, and a batch whose one request fails cancels the others."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from gateway.backend import Backend
from gateway.choices import Choices
from gateway.errors import ApiError
from gateway.routing import InstanceRegistry
from protos.tandem.v1 import common_pb2, decode_pb2_grpc, generation_pb2
from tests.unit.test_gateway_convert import SPEC
from tests.unit.test_gateway_reroute import PREFILL, decode_server  # noqa: F401 (fixture)


class _Branches(decode_pb2_grpc.DecodeServicer):
    """One token for each of the request's n branches, then (fail=False) nothing until the
    call is cancelled, or (fail=True) INTERNAL."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.cancelled = threading.Event()

    def Generate(self, request, context):
        context.add_callback(self.cancelled.set)
        for index in range(request.n):
            yield generation_pb2.GenerateResponse(token_ids=[7], text="x", index=index)
        if self.fail:
            context.abort(grpc.StatusCode.INTERNAL, "a KV contract fault")
        self.cancelled.wait(10)


def _backend(addresses: list[str]) -> Backend:
    return Backend(SPEC, InstanceRegistry([PREFILL], addresses), None, request_timeout_s=10.0)


def test_a_shut_down_n_request_ends_each_branch_with_abort(decode_server):
    backend = _backend([decode_server(_Branches())])

    async def run() -> list[generation_pb2.GenerateResponse]:
        stream = backend.start("r", [5, 6], common_pb2.SamplingParams(max_tokens=9), n=3)
        choices = Choices([stream], 3, 3, False)
        out = [resp for _, resp in [await anext(choices) for _ in range(3)]]
        assert backend.abort_all() == 1
        out += [resp async for _, resp in choices]
        await choices.close()
        await backend.close()
        return out

    responses = asyncio.run(run())
    aborts = [r for r in responses if r.finish_reason == common_pb2.FINISH_REASON_ABORT]
    assert sorted(r.index for r in aborts) == [0, 1, 2]
    assert [r.usage.completion_tokens for r in aborts] == [1, 1, 1]


def test_one_failing_request_of_a_batch_cancels_the_others(decode_server):
    good, bad = _Branches(), _Branches(fail=True)
    backend = _backend([decode_server(good)])
    bad_backend = _backend([decode_server(bad)])

    async def run() -> None:
        sampling = common_pb2.SamplingParams(max_tokens=9)
        streams = [backend.start("r-0", [5], sampling, n=2),
                   bad_backend.start("r-1", [6], sampling, n=2)]
        choices = Choices(streams, 2, 2, False)
        with pytest.raises(ApiError) as info:
            async for _ in choices:
                pass
        assert info.value.grpc_code == grpc.StatusCode.INTERNAL
        await backend.close()
        await bad_backend.close()

    asyncio.run(run())
    assert good.cancelled.wait(5)
