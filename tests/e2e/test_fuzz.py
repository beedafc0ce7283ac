"""Fuzzing the public APIs of a real `tandem serve`: schemathesis generates requests (valid and
invalid) from the gateway's own OpenAPI schema for every POST endpoint, and hypothesis builds
GenerateRequest messages with arbitrary field values for the gRPC API. No answer may be a 5xx
(no drain is under way) or, over gRPC, INTERNAL / UNKNOWN / DATA_LOSS; afterwards the servers
are healthy, answer a normal request, and hold no KV block.

Seeded (`derandomize`) and bounded (a few dozen examples per operation), so the run is the same
every time and takes well under a minute; the context is capped at 64 tokens so that the valid
requests that do generate finish fast."""

from __future__ import annotations

import grpc
import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")  # the test extra installs it (and hypothesis)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from protos.tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402

FUZZ_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
POST_PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/tokenize", "/v1/detokenize"]
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


@pytest.fixture(scope="module")
def served(tiny_models, serve_model):
    return serve_model(tiny_models["llama"], "--max-model-len", "64")


@pytest.mark.parametrize("path", POST_PATHS)
def test_http_api_never_answers_5xx(served, path):
    base = f"http://127.0.0.1:{served.http_port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    seen: list[int] = []

    @FUZZ_SETTINGS
    @given(case=schema[path]["POST"].as_strategy())
    def run(case) -> None:
        response = case.call(base_url=base, timeout=60)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.body, response.status_code, response.text)
        if response.status_code >= 400:  # every error is an OpenAI envelope
            assert set(response.json()["error"]) >= {"message", "type", "param", "code"}

    run()
    assert any(code == 200 for code in seen) or path.endswith("completions"), seen
    assert httpx.get(f"{base}/health").status_code == 200
    served.assert_all_blocks_free()


text = st.text(max_size=40)
sampling = st.builds(
    common_pb2.SamplingParams,
    max_tokens=st.integers(0, 2**32 - 1), temperature=st.floats(allow_nan=True, width=32),
    top_p=st.floats(width=32), top_k=st.integers(0, 2**32 - 1),
    seed=st.integers(0, 2**64 - 1), stop=st.lists(text, max_size=3),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=3), ignore_eos=st.booleans(),
    min_tokens=st.integers(0, 2**32 - 1))
generate_requests = st.builds(
    generation_pb2.GenerateRequest, request_id=text, model=st.sampled_from(["", "llama", "x"]),
    text=text, sampling=sampling)


def test_grpc_api_never_answers_a_server_fault(served):
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    stub = generation_pb2_grpc.GenerationStub(channel)

    @FUZZ_SETTINGS
    @given(request=generate_requests)
    def run(request) -> None:
        request.sampling.max_tokens %= 80  # a request that is accepted stays short
        try:
            list(stub.Generate(request, timeout=60))
        except grpc.RpcError as error:
            assert error.code() not in SERVER_FAULTS, (request, error.code(), error.details())

    run()
    ok = generation_pb2.GenerateRequest(text="hello", sampling=common_pb2.SamplingParams(
        max_tokens=4, temperature=0.0))
    assert sum(len(r.token_ids) for r in stub.Generate(ok, timeout=60)) == 4
    channel.close()
    served.assert_all_blocks_free()
