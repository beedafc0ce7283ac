"""Bad input gets a clear error and the servers stay healthy; the public gRPC API, health and
reflection work as clients in any language (and grpcurl) would use them."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from protos.tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.reference import hf_greedy


@pytest.fixture(scope="module")
def served(tiny_models, serve_model):
    return serve_model(tiny_models["llama"])


@pytest.fixture
def http(served):
    with httpx.Client(base_url=f"http://127.0.0.1:{served.http_port}", timeout=60) as client:
        yield client
        assert client.get("/health").status_code == 200
    served.assert_all_blocks_free()


@pytest.fixture
def channel(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        yield channel
    served.assert_all_blocks_free()


def assert_envelope(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code


def test_http_errors(served, http):
    model = served.model_dir.name
    assert_envelope(http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404,
                    "model_not_found")
    assert_envelope(http.post("/v1/completions", json={"model": model, "prompt": ""}), 400)
    assert_envelope(http.post("/v1/completions", json={"model": model, "prompt": "hi",
                                                       "max_tokens": 0}), 400)
    assert_envelope(http.post("/v1/completions", content=b"{not json",
                              headers={"content-type": "application/json"}), 400)
    assert_envelope(http.post("/v1/completions", json={"model": model, "prompt": "hi",
                                                       "max_tokens": 10**6}), 400,
                    "context_length_exceeded")
    assert_envelope(http.post("/v1/chat/completions", json={"model": model, "messages": "x"}), 400)
    # unknown fields are ignored, never a 422
    ok = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2,
                                            "some_future_field": 1})
    assert ok.status_code == 200


def test_models_and_health(served, http):
    listed = http.get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == [served.model_dir.name]
    assert http.get("/health").status_code == 200


def test_openai_client_sees_errors_without_retrying(served):
    client = openai.OpenAI(base_url=served.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=served.model_dir.name, prompt="hi", max_tokens=0)


def test_bodies_and_messages_over_16_mib_are_refused(served, http, channel):
    """The documented limits: an HTTP body over --max-request-bytes (16 MiB) is a 413 whether
    its size is announced (Content-Length) or not (chunked), and a gRPC message over 16 MiB is
    RESOURCE_EXHAUSTED; the servers stay healthy (the fixtures check)."""
    model, over = served.model_dir.name, 16 * 2**20 + 1
    body = b'{"model": "%s", "prompt": "%s"}' % (model.encode(), b"a" * over)
    assert_envelope(http.post("/v1/completions", content=body,
                              headers={"content-type": "application/json"}),
                    413, "request_too_large")
    chunks = (body[i:i + 2**16] for i in range(0, len(body), 2**16))  # no Content-Length
    assert_envelope(http.post("/v1/completions", content=chunks,
                              headers={"content-type": "application/json"}),
                    413, "request_too_large")
    client = openai.OpenAI(base_url=served.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=model, prompt="a" * over, max_tokens=2)
    assert info.value.status_code == 413
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = generation_pb2.GenerateRequest(
        model=model, text="a" * over, sampling=common_pb2.SamplingParams(max_tokens=2))
    with pytest.raises(grpc.RpcError) as rpc:
        list(stub.Generate(request, timeout=60))
    assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_prompt_far_over_the_context_is_refused_without_tokenizing_it(served, http):
    """12 MB of text (under the body limit) is a 400 context_length_exceeded from a lower bound
    on its token count (Tokenizer.surely_longer_than), for completions and chat alike."""
    model, text = served.model_dir.name, "Hello world! " * 1_000_000
    assert_envelope(http.post("/v1/completions", json={"model": model, "prompt": text}), 400,
                    "context_length_exceeded")
    chat = http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": text}]})
    assert_envelope(chat, 400, "context_length_exceeded")
    assert chat.json()["error"]["param"] == "messages"


def test_grpc_generate_with_token_ids_matches_transformers(served, channel):
    stub = generation_pb2_grpc.GenerationStub(channel)
    prompt = [11, 12, 13, 14, 15]
    responses = list(stub.Generate(generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=9, temperature=0.0)), timeout=60))
    ids = [t for r in responses for t in r.token_ids]
    assert ids == hf_greedy(served.model_dir, prompt, 9)
    last = responses[-1]
    assert last.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert last.usage.completion_tokens == len(ids) and last.usage.prompt_tokens == 5
    assert last.timings.transfer_bytes > 0 and last.timings.time_to_first_token_s > 0
    assert last.timings.prefill_s > 0  # the prompt was computed on the prefill tier


def test_grpc_text_prompt_and_model_info(served, channel):
    stub = generation_pb2_grpc.GenerationStub(channel)
    info = stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=10)
    assert info.name == served.model_dir.name and info.max_model_len > 0
    responses = list(stub.Generate(generation_pb2.GenerateRequest(
        text="hello world", sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0)),
        timeout=60))
    hf_tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    prompt = hf_tokenizer("hello world").input_ids
    # ModelInfo says what a text prompt gets: here BOS, as transformers adds it
    assert info.HasField("bos_token_id") and info.bos_token_id == hf_tokenizer.bos_token_id
    assert info.text_prompt_adds_special_tokens == (
        prompt != hf_tokenizer("hello world", add_special_tokens=False).input_ids)
    ids = [t for r in responses for t in r.token_ids]
    assert ids == hf_greedy(served.model_dir, prompt, 4)  # the gateway tokenized it the same way
    assert responses[-1].usage.prompt_tokens == len(prompt)


@pytest.mark.parametrize("request_kwargs", [
    dict(sampling=common_pb2.SamplingParams(max_tokens=4)),                      # no prompt
    dict(text="", sampling=common_pb2.SamplingParams(max_tokens=4)),             # empty prompt
    dict(text="hi", sampling=common_pb2.SamplingParams(max_tokens=0)),           # max_tokens 0
    dict(token_ids=generation_pb2.TokenIds(ids=[10**7]),
         sampling=common_pb2.SamplingParams(max_tokens=4)),                      # id out of vocab
])
def test_grpc_malformed_is_invalid_argument(served, channel, request_kwargs):
    stub = generation_pb2_grpc.GenerationStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(generation_pb2.GenerateRequest(**request_kwargs), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_unknown_model_is_not_found(served, channel):
    stub = generation_pb2_grpc.GenerationStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(generation_pb2.GenerateRequest(
            model="nope", text="hi", sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=30))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_on_every_server(served):
    for address in [f"127.0.0.1:{served.grpc_port}", *served.prefill, *served.decode]:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            response = next(reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            names = {s.name for s in response.list_services_response.service}
            assert "grpc.health.v1.Health" in names and any(n.startswith("tandem.v1.") for n in names)
            # grpc.reflection.v1 too (same messages on the wire): a service's descriptors
            v1 = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            service = next(n for n in names if n.startswith("tandem.v1."))
            answer = next(v1(iter([reflection_pb2.ServerReflectionRequest(
                file_containing_symbol=service)]), timeout=10))
            assert answer.file_descriptor_response.file_descriptor_proto, answer


def test_grpc_abort_ends_the_stream_and_frees_blocks(served, channel):
    stub = generation_pb2_grpc.GenerationStub(channel)
    stream = stub.Generate(generation_pb2.GenerateRequest(
        request_id="to-abort", token_ids=generation_pb2.TokenIds(ids=[20, 21, 22]),
        sampling=common_pb2.SamplingParams(max_tokens=900, ignore_eos=True, temperature=0.0)),
        timeout=60)
    next(stream)
    assert stub.Abort(generation_pb2.AbortRequest(request_id="to-abort"), timeout=10).aborted
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert not stub.Abort(generation_pb2.AbortRequest(request_id="to-abort"), timeout=10).aborted


def test_http_client_disconnect_mid_stream_frees_blocks(served, http):
    body = {"model": served.model_dir.name, "prompt": "hello", "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    # leaving the block closed the connection; the http fixture checks every pool is free
