"""A decode instance that fails under a request: the gateway takes it out of the routing and opens
the request again on another decode instance when nothing was sent yet (gateway/backend.py);
one that answers UNAVAILABLE for the request's own sake but is healthy keeps its place.

Real gRPC servers stand in for the decode tier (a fixed answer each); the dead one is an address
nothing listens on."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from engine.tokenizer import Tokenizer
from gateway.app import create_app
from gateway.backend import Backend
from gateway.routing import InstanceRegistry
from protos.tandem.v1 import common_pb2, decode_pb2_grpc, generation_pb2
from tests.unit.test_gateway_convert import SPEC, UNREACHABLE

PREFILL = "127.0.0.1:2"  # never called: the fake decode tiers answer by themselves


class _DecodeTier(decode_pb2_grpc.DecodeServicer):
    """Answers every Generate with one token and finish_reason length, or (unavailable=True)
    with UNAVAILABLE while its health stays SERVING (a prefill peer gone, say)."""

    def __init__(self, unavailable: bool = False) -> None:
        self.unavailable = unavailable
        self.calls = 0

    def Generate(self, request, context):
        self.calls += 1
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "prefill instance 127.0.0.1:2 went away")
        yield generation_pb2.GenerateResponse(
            token_ids=[7], text="x", finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                   completion_tokens=1))


@pytest.fixture
def decode_server():
    """decode_server(tier) -> its address; every server is stopped after the test."""
    servers = []

    def start(tier: _DecodeTier) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        decode_pb2_grpc.add_DecodeServicer_to_server(tier, server)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)  # SERVING
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def _client(tokenizer_dir: Path, decode_addresses: list[str]) -> tuple[TestClient, Backend]:
    backend = Backend(SPEC, InstanceRegistry([PREFILL], decode_addresses),
                      Tokenizer.from_dir(tokenizer_dir), request_timeout_s=10.0)
    return TestClient(create_app(backend)), backend


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_on_a_dead_decode_instance_moves_to_a_live_one(
        tiny_tokenizer_dir, decode_server, stream):
    live = _DecodeTier()
    client, backend = _client(tiny_tokenizer_dir, [UNREACHABLE, decode_server(live)])
    dead_instance = backend.registry.decode[0]
    with client:
        # the first pick is the dead instance (ready until a health check says otherwise)
        response = client.post("/v1/completions",
                               json={"prompt": [5, 6], "max_tokens": 1, "stream": stream})
        assert response.status_code == 200, response.text
        assert not dead_instance.ready  # out of the routing at once
        assert live.calls == 1
        metrics = backend.metrics.registry
        assert metrics.get_sample_value("tandem:requests_moved_total", {"tier": "gateway"}) == 1
        assert metrics.get_sample_value("tandem:decode_instance_failures_total",
                                        {"tier": "gateway"}) == 1
        for _ in range(3):  # the next ones go to the live instance directly
            assert client.post("/v1/completions",
                               json={"prompt": [5], "max_tokens": 1}).status_code == 200
        assert live.calls == 4
        assert metrics.get_sample_value("tandem:requests_moved_total", {"tier": "gateway"}) == 1


def test_a_healthy_instance_that_answers_unavailable_keeps_its_place(
        tiny_tokenizer_dir, decode_server):
    tier = _DecodeTier(unavailable=True)
    other = _DecodeTier()
    client, backend = _client(tiny_tokenizer_dir, [decode_server(tier), decode_server(other)])
    with client:
        response = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 1})
        assert response.status_code == 503, response.text
        assert "prefill instance" in response.json()["error"]["message"]
        assert backend.registry.decode[0].ready and other.calls == 0  # not moved: not its fault


def test_no_live_decode_instance_is_a_503(tiny_tokenizer_dir):
    client, backend = _client(tiny_tokenizer_dir, [UNREACHABLE, "127.0.0.1:3"])
    with client:
        response = client.post("/v1/completions", json={"prompt": [5], "max_tokens": 1})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert not any(i.ready for i in backend.registry.decode)
