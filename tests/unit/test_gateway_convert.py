"""Gateway request validation, conversions, error envelopes and SSE framing; and the HTTP app
over a real Backend whose instances are unreachable (every error path, no tier needed)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient

from engine.tokenizer import Tokenizer
from gateway import sse
from gateway import convert
from gateway.app import create_app
from gateway.backend import Backend, RequestStream
from gateway.errors import ApiError, from_rpc_error, http_status
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.routing import InstanceRegistry
from protos.tandem.v1 import common_pb2, generation_pb2, instance_pb2

INFO = instance_pb2.InstanceInfo(role=instance_pb2.ROLE_DECODE, model_name="tiny",
                                 max_model_len=64, vocab_size=2048, eos_token_ids=[2],
                                 architecture="LlamaForCausalLM")
SPEC = convert.ModelSpec.from_pb(INFO)
UNREACHABLE = "127.0.0.1:1"


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": [5, 6, 7], **fields})


def raises(grpc_code: grpc.StatusCode, code: str | None = None):
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(ApiError)
            self.info = self.ctx.__enter__()

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert self.info.value.grpc_code == grpc_code and self.info.value.code == code
            return handled
    return _Check()


# protocol and validation
def test_unknown_fields_ignored_and_aliases() -> None:
    req = completion(foo=1, max_completion_tokens=9, stop="x", stream_options={"include_usage": 1})
    assert req.max_new_tokens() == 9 and req.include_usage()
    assert completion(max_tokens=3, max_completion_tokens=9).max_new_tokens() == 3


def test_check_model() -> None:
    convert.check_model(None, SPEC)
    convert.check_model("tiny", SPEC)
    with raises(grpc.StatusCode.NOT_FOUND, "model_not_found"):
        convert.check_model("gpt-4", SPEC)


@pytest.mark.parametrize("fields", [{"n": 2}, {"logprobs": 1}, {"min_p": 0.1}, {"best_of": 2},
                                    {"repetition_penalty": 1.1}, {"echo": True}])
def test_unsupported_parameters_are_400(fields: dict) -> None:
    with raises(grpc.StatusCode.INVALID_ARGUMENT, "unsupported_parameter"):
        convert.check_supported(completion(**fields))


def test_default_values_of_unsupported_parameters_pass() -> None:
    convert.check_supported(completion(n=1, min_p=0.0, repetition_penalty=1.0, logprobs=None))


def test_prompt_forms(tiny_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    assert convert.completion_prompt_ids("hello", tok, SPEC) == tok.encode("hello")
    assert convert.completion_prompt_ids(["hello"], tok, SPEC) == tok.encode("hello")
    assert convert.completion_prompt_ids([1, 2], tok, SPEC) == [1, 2]
    assert convert.completion_prompt_ids([[1, 2]], tok, SPEC) == [1, 2]
    for bad in ("", [], ["a", "b"], [[1], [2]], [5000]):
        with pytest.raises(ApiError) as info:
            convert.completion_prompt_ids(bad, tok, SPEC)
        assert info.value.http_status == 400


def test_sampling_defaults_fill_the_context() -> None:
    sp = convert.sampling_from_request(completion(), 10, SPEC)
    assert sp.max_tokens == 54 and not sp.HasField("temperature") and not sp.HasField("top_k")


def test_sampling_fields() -> None:
    req = completion(max_tokens=4, temperature=0, top_p=0.5, top_k=-1, seed=-1,
                     stop=["", "END"], stop_token_ids=[3], ignore_eos=True)
    sp = convert.sampling_from_request(req, 3, SPEC)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.seed) == (4, 0.0, 0.5, 2**64 - 1)
    assert not sp.HasField("top_k") and list(sp.stop) == ["END"] and sp.ignore_eos
    assert list(sp.stop_token_ids) == [3]
    assert convert.sampling_from_request(completion(top_k=5, stop="x"), 3, SPEC).top_k == 5


@pytest.mark.parametrize("fields,prompt_len,code", [
    ({"max_tokens": 0}, 3, None), ({"max_tokens": -1}, 3, None),
    ({"max_tokens": 62}, 3, "context_length_exceeded"), ({}, 64, "context_length_exceeded"),
    ({"temperature": -0.1}, 3, None), ({"top_p": 0.0}, 3, None), ({"top_p": 1.5}, 3, None),
    ({"stop_token_ids": [4096]}, 3, None)])
def test_sampling_validation(fields: dict, prompt_len: int, code: str | None) -> None:
    with raises(grpc.StatusCode.INVALID_ARGUMENT, code):
        convert.sampling_from_request(completion(**fields), prompt_len, SPEC)


def test_grpc_sampling_requires_max_tokens() -> None:
    with raises(grpc.StatusCode.INVALID_ARGUMENT):
        convert.check_sampling_pb(common_pb2.SamplingParams(), 3, SPEC)
    sp = convert.check_sampling_pb(common_pb2.SamplingParams(max_tokens=2, stop=["", "a"]), 3, SPEC)
    assert sp.max_tokens == 2 and list(sp.stop) == ["a"]


def test_chat_messages_join_text_parts() -> None:
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "name": "bob"}]})
    assert convert.chat_messages(req) == [{"role": "user", "content": "ab", "name": "bob"}]
    image = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with raises(grpc.StatusCode.INVALID_ARGUMENT):
        convert.chat_messages(image)


# responses, errors, SSE
def test_response_bodies() -> None:
    body = convert.completion_body("cmpl-1", "tiny", 7, "hi", "stop")
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "hi"
    chat = convert.chat_body("c-1", "tiny", 7, "hi", "length", stream=False)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    first = convert.chat_body("c-1", "tiny", 7, "", None, stream=True, first=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = convert.usage_dict(common_pb2.Usage(prompt_tokens=3, completion_tokens=4))
    assert usage["total_tokens"] == 7
    timings = convert.timings_dict(common_pb2.PhaseTimings(prefill_s=0.5), gateway_e2e_s=1.0)
    assert timings["prefill_s"] == 0.5 and timings["transfer_bytes"] == 0
    assert "gateway_e2e_s" in timings
    assert convert.finish_reason(common_pb2.FINISH_REASON_LENGTH) == "length"
    assert convert.finish_reason(common_pb2.FINISH_REASON_UNSPECIFIED) is None


def test_error_envelope_and_status_mapping() -> None:
    err = ApiError(grpc.StatusCode.INVALID_ARGUMENT, "bad", "prompt", "x")
    assert err.to_dict() == {"error": {"message": "bad", "type": "invalid_request_error",
                                       "param": "prompt", "code": "x"}}
    expected = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400,
                "RESOURCE_EXHAUSTED": 503, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
                "INTERNAL": 500, "CANCELLED": 500, "UNKNOWN": 500}
    assert {name: http_status(grpc.StatusCode[name]) for name in expected} == expected

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return "decode KV cache full"
    err = from_rpc_error(Failed())
    assert err.http_status == 503 and err.message == "decode KV cache full"


def test_sse_framing() -> None:
    frame = convert.sse_event({"a": "é"})
    assert frame == 'data: {"a":"é"}\n\n'
    assert convert.SSE_DONE == "data: [DONE]\n\n" and convert.SSE_PING.startswith(":")


def _call(fmt, include_usage: bool) -> sse.Call:
    backend = Backend(SPEC, InstanceRegistry([UNREACHABLE], [UNREACHABLE]), None)
    stream = RequestStream(backend, "r-1", 3, tuple(backend.registry.instances), call=None)
    return sse.Call("r-1", "tiny", 7, fmt, stream, include_usage)


def _frames(texts: list[str]) -> list[dict]:
    return [json.loads(t[len("data: "):]) for t in texts]


def test_stream_chunks_chat_with_usage() -> None:
    call = _call(sse.CHAT, include_usage=True)
    resp = generation_pb2.GenerateResponse(token_ids=[1], text="He")
    first = _frames(sse.sse_chunks(call, resp, True))
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert first[0]["usage"] is None
    last = generation_pb2.GenerateResponse(
        text="", finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2))
    finish, usage = _frames(sse.sse_chunks(call, last, False))
    assert finish["choices"][0]["finish_reason"] == "stop" and "tandem_timings" in finish
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    assert sse.sse_chunks(call, generation_pb2.GenerateResponse(token_ids=[9]), False) == []


def test_stream_chunks_completion_without_usage() -> None:
    call = _call(sse.COMPLETION, include_usage=False)
    last = generation_pb2.GenerateResponse(text="!", finish_reason=common_pb2.FINISH_REASON_LENGTH)
    (frame,) = _frames(sse.sse_chunks(call, last, True))
    assert frame["choices"][0] == {"index": 0, "text": "!", "logprobs": None,
                                   "finish_reason": "length"}
    assert "usage" not in frame


# the app over unreachable instances
@pytest.fixture(scope="module")
def client(tiny_tokenizer_dir: Path):
    backend = Backend(SPEC, InstanceRegistry([UNREACHABLE], [UNREACHABLE]),
                      Tokenizer.from_dir(tiny_tokenizer_dir), request_timeout_s=5.0)
    with TestClient(create_app(backend)) as c:
        yield c


def _error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def test_malformed_json_is_400(client: TestClient) -> None:
    resp = client.post("/v1/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert "JSON" in _error(resp, 400)["message"]
    _error(client.post("/v1/completions", json=[1, 2]), 400)
    _error(client.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 400)
    _error(client.post("/v1/chat/completions", json={"messages": []}), 400)


@pytest.mark.parametrize("body,status,code", [
    ({"model": "nope", "prompt": "hi"}, 404, "model_not_found"),
    ({"prompt": ""}, 400, None), ({"prompt": []}, 400, None),
    ({"prompt": "hi", "max_tokens": 0}, 400, None),
    ({"prompt": "hi", "n": 2, "unknown_field": 1}, 400, "unsupported_parameter"),
    ({"prompt": "hi", "logprobs": 2}, 400, "unsupported_parameter"),
    ({"prompt": [1] * 60, "max_tokens": 10}, 400, "context_length_exceeded"),
    ({"prompt": "hi", "stream": True, "max_tokens": 0}, 400, None)])
def test_completion_errors(client: TestClient, body: dict, status: int, code: str | None) -> None:
    _error(client.post("/v1/completions", json=body), status, code)


def test_chat_errors(client: TestClient) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    _error(client.post("/v1/chat/completions", json={"model": "x", "messages": msgs}), 404,
           "model_not_found")
    _error(client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 0}), 400)


@pytest.mark.parametrize("stream", [False, True])
def test_unreachable_decode_tier_is_503_before_any_stream_bytes(client: TestClient,
                                                                stream: bool) -> None:
    resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": stream})
    assert resp.headers["content-type"].startswith("application/json")
    _error(resp, 503, "unavailable")


def test_health_models_version_and_unknown_route(client: TestClient) -> None:
    assert client.get("/health").status_code == 503
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["object"] == "list"
    assert client.get("/version").json()["version"]
    _error(client.get("/v1/nothing"), 404)


# routing and start-up checks (no network)
def _registry_with_info(**overrides) -> InstanceRegistry:
    registry = InstanceRegistry(["p:1"], ["d:1", "d:2"])
    for instance in registry.instances:
        instance.info = instance_pb2.InstanceInfo()
        instance.info.CopyFrom(INFO)
        instance.info.role = instance.role
    for field, value in overrides.items():
        setattr(registry.decode[1].info, field, value)
    return registry


def test_pick_least_loaded_round_robin_and_unready() -> None:
    registry = _registry_with_info()
    d1, d2 = registry.decode
    assert [registry.pick(instance_pb2.ROLE_DECODE) for _ in range(4)] == [d1, d2, d1, d2]
    registry.acquire(d1)
    assert registry.pick(instance_pb2.ROLE_DECODE) is d2
    registry.release(d1)
    d1.ready = d2.ready = False
    with raises(grpc.StatusCode.UNAVAILABLE):
        registry.pick(instance_pb2.ROLE_DECODE)


def test_check_consistent() -> None:
    from gateway.routing import check_consistent
    assert check_consistent(_registry_with_info(), None).name == "tiny"
    assert check_consistent(_registry_with_info(), "alias").name == "alias"
    with pytest.raises(ValueError, match="max_model_len"):
        check_consistent(_registry_with_info(max_model_len=32), None)
    with pytest.raises(ValueError, match="role"):
        check_consistent(_registry_with_info(role=instance_pb2.ROLE_PREFILL), None)


def test_throughput_report_only_after_traffic() -> None:
    from gateway.backend import GatewayStats
    stats = GatewayStats(last_report=0.0)
    assert stats.report(10.0) is None
    stats.num_finished, stats.num_generated_tokens = 5, 100
    assert stats.report(20.0) == "throughput: 0.50 req/s, 10.0 generated tok/s, in-flight 0"


def test_json_body_without_json_content_type(client: TestClient) -> None:
    """curl -d sends application/x-www-form-urlencoded; the body is still JSON."""
    resp = client.post("/v1/completions", content=b'{"prompt": [1], "max_tokens": 0}',
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert _error(resp, 400)["param"] == "max_tokens"
