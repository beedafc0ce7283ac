"""Gateway request validation, conversions, error envelopes and SSE framing; and the HTTP app
over a real Backend whose instances are unreachable (every error path, no tier needed), or whose
decode instance refuses every request (a full queue: 429)."""

from __future__ import annotations

import argparse
import json
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from engine.tokenizer import Tokenizer
from gateway import sse
from gateway import convert
from gateway.app import create_app
from gateway.backend import Backend, RequestStream
from gateway.choices import Choices, rank_branches
from gateway.errors import ApiError, ApiKey, error_response, from_rpc_error, http_status
from gateway.flags import add_arguments, api_key, origins
from gateway.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from gateway.routing import InstanceRegistry
from protos.tandem.v1 import common_pb2, decode_pb2_grpc, generation_pb2, instance_pb2

INFO = instance_pb2.InstanceInfo(role=instance_pb2.ROLE_DECODE, model_name="tiny",
                                 max_model_len=64, vocab_size=2048, eos_token_ids=[2],
                                 architecture="LlamaForCausalLM")
SPEC = convert.ModelSpec.from_pb(INFO)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
UNREACHABLE = "127.0.0.1:1"


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": [5, 6, 7], **fields})


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **fields})


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
    assert req.max_new_tokens() == 9 and req.include_usage() and not req.continuous_usage()
    assert chat(foo={"bar": 1}, messages=[{"role": "user", "content": "hi", "extra": 1}])


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    """As OpenAI and vLLM: when both are given, max_completion_tokens sets the length, and
    errors name it."""
    req = completion(max_tokens=3, max_completion_tokens=9)
    assert req.max_new_tokens() == 9
    assert convert.sampling_from_request(req, 3, SPEC).max_tokens == 9
    assert convert.sampling_from_request(completion(max_tokens=3), 3, SPEC).max_tokens == 3
    with pytest.raises(ApiError) as info:
        convert.sampling_from_request(completion(max_tokens=3, max_completion_tokens=0), 3, SPEC)
    assert info.value.param == "max_completion_tokens"


def test_check_model() -> None:
    convert.check_model(None, SPEC)
    convert.check_model("tiny", SPEC)
    with raises(grpc.StatusCode.NOT_FOUND, "model_not_found"):
        convert.check_model("gpt-4", SPEC)


@pytest.mark.parametrize("make,fields", [
    (chat, {"echo": True}),
    (chat, {"functions": [{"name": "f"}]}), (chat, {"function_call": "auto"})])
def test_unsupported_parameters_are_400_naming_them(make, fields: dict) -> None:
    """Never accepted and silently ignored (an unconstrained 200 for a JSON schema, say)."""
    with pytest.raises(ApiError) as info:
        convert.check_supported(make(**fields))
    err = info.value
    assert (err.http_status, err.code, err.param) == (400, "unsupported_parameter", *fields)
    assert "not supported yet" in err.message


def test_no_op_values_of_unsupported_parameters_pass() -> None:
    convert.check_supported(completion(n=1, logprobs=None, best_of=1, echo=False))
    convert.check_supported(chat(tools=[], tool_choice="none", functions=[],
                                 function_call="none"))


def test_stream_options_need_stream() -> None:
    with raises(grpc.StatusCode.INVALID_ARGUMENT):
        convert.check_stream_options(completion(stream_options={"include_usage": True}))
    with pytest.raises(ApiError) as info:
        convert.check_stream_options(chat(stream=False, stream_options={}))
    assert info.value.param == "stream_options"
    convert.check_stream_options(completion(stream=True, stream_options={"include_usage": True}))
    convert.check_stream_options(completion())


def test_unknown_message_role_is_400_naming_it() -> None:
    roles = sorted(convert.CHAT_ROLES)
    messages = [{"role": role, "content": "x"} for role in roles]
    assert [m["role"] for m in convert.chat_messages(chat(messages=messages).messages)] == roles
    bad = chat(messages=[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ApiError) as info:
        convert.chat_messages(bad.messages)
    assert info.value.http_status == 400 and info.value.param == "messages.1.role"


def test_min_tokens() -> None:
    sp = convert.sampling_from_request(completion(max_tokens=8, min_tokens=3), 3, SPEC)
    assert sp.min_tokens == 3
    assert not convert.sampling_from_request(completion(max_tokens=8), 3, SPEC).HasField(
        "min_tokens")
    assert convert.sampling_from_request(completion(min_tokens=61), 3, SPEC).min_tokens == 61
    for fields in ({"max_tokens": 2, "min_tokens": 3}, {"min_tokens": -1},
                   {"max_completion_tokens": 4, "max_tokens": 9, "min_tokens": 5}):
        with pytest.raises(ApiError) as info:
            convert.sampling_from_request(completion(**fields), 3, SPEC)
        assert info.value.param == "min_tokens"
    with pytest.raises(ApiError) as info:
        convert.check_sampling_pb(common_pb2.SamplingParams(max_tokens=2, min_tokens=3), 3, SPEC)
    assert info.value.param == "sampling.min_tokens"
    assert convert.check_sampling_pb(common_pb2.SamplingParams(max_tokens=4, min_tokens=4), 3,
                                     SPEC).min_tokens == 4


@pytest.mark.parametrize("make", [completion, chat])
def test_output_text_flags_reach_sampling_with_vllm_defaults(make) -> None:
    default = convert.sampling_from_request(make(max_tokens=4), 3, SPEC)
    assert not default.HasField("skip_special_tokens") and not default.include_stop_str_in_output
    sp = convert.sampling_from_request(
        make(max_tokens=4, skip_special_tokens=False, include_stop_str_in_output=True), 3, SPEC)
    assert sp.HasField("skip_special_tokens") and not sp.skip_special_tokens
    assert sp.include_stop_str_in_output
    kept = convert.sampling_from_request(make(max_tokens=4, skip_special_tokens=True), 3, SPEC)
    assert kept == default
    grpc_sp = common_pb2.SamplingParams(max_tokens=4, skip_special_tokens=False,
                                        include_stop_str_in_output=True)
    assert convert.check_sampling_pb(grpc_sp, 3, SPEC) == grpc_sp


def test_tokenize_ids(tiny_tokenizer_dir: Path, metaspace_tokenizer_dir: Path) -> None:
    """vLLM's defaults: a prompt gets the special tokens (here Llama 2's BOS), messages none
    (the template writes them); add_special_tokens turns either way."""
    tok = Tokenizer.from_dir(metaspace_tokenizer_dir)
    with_bos = convert.tokenize_ids(TokenizeRequest(prompt="hello world"), tok)
    assert with_bos == tok.encode("hello world") and with_bos[0] == tok.bos_token_id
    assert convert.tokenize_ids(TokenizeRequest(prompt="hello world", add_special_tokens=False),
                                tok) == with_bos[1:]
    chat_tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    messages = [{"role": "user", "content": "hi"}]
    req = TokenizeRequest.model_validate({"messages": messages, "add_generation_prompt": False})
    assert convert.tokenize_ids(req, chat_tok) == chat_tok.encode_chat(messages, False)
    for bad, param in (({}, "prompt"),
                       ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role")):
        with pytest.raises(ApiError) as info:
            convert.tokenize_ids(TokenizeRequest.model_validate(bad), chat_tok)
        assert info.value.http_status == 400 and info.value.param == param


def test_prompt_forms(tiny_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    assert convert.completion_prompt_ids("hello", tok, SPEC) == tok.encode("hello")
    assert convert.completion_prompt_ids([1, 2], tok, SPEC) == [1, 2]
    assert convert.completion_prompts("hello") == ["hello"]
    assert convert.completion_prompts([1, 2]) == [[1, 2]]
    assert convert.completion_prompts(["a", "b"]) == ["a", "b"]
    assert convert.completion_prompts([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ("", [], [5000]):
        with pytest.raises(ApiError) as info:
            convert.completion_prompt_ids(bad, tok, SPEC, "prompt.2")
        assert info.value.http_status == 400 and info.value.param == "prompt.2"


@pytest.mark.parametrize("fields, param", [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": -1}, "n"), ({"n": 2, "best_of": 1}, "best_of"),
    ({"best_of": 17}, "best_of"), ({"n": 1, "best_of": 2, "stream": True}, "best_of")])
def test_bad_n_and_best_of_are_400_naming_them(fields: dict, param: str) -> None:
    with pytest.raises(ApiError) as info:
        convert.num_choices(completion(**fields))
    assert (info.value.http_status, info.value.param) == (400, param)


def test_n_and_best_of() -> None:
    assert convert.num_choices(completion()) == (1, 1)
    assert convert.num_choices(completion(n=3)) == (3, 3)
    assert convert.num_choices(completion(n=2, best_of=4)) == (2, 4)
    assert convert.num_choices(completion(n=2, best_of=2, stream=True)) == (2, 2)
    assert convert.num_choices(chat(n=4, stream=True)) == (4, 4)
    with pytest.raises(ApiError) as info:
        convert.num_choices(completion(best_of=16), num_prompts=17)
    assert info.value.param == "prompt"
    # best_of > n ranks by logprobs: the tiers are asked for the chosen tokens' own
    assert convert.sampling_from_request(completion(best_of=2), 3, SPEC).logprobs == 0
    assert not convert.sampling_from_request(completion(), 3, SPEC).HasField("logprobs")
    assert convert.check_choices_pb(0, 0) == (1, 1)
    assert convert.check_choices_pb(2, 0) == (2, 2)
    with pytest.raises(ApiError):
        convert.check_choices_pb(3, 2)


def test_best_of_ranks_by_cumulative_logprob() -> None:
    def branch(*values):
        return [common_pb2.TokenLogprobs(token_id=1, logprob=v) for v in values]

    branches = [branch(-1.0, -1.0), branch(-0.5), branch(-3.0), branch(-0.5, -0.0)]
    assert rank_branches(branches, 2) == [1, 3]
    assert rank_branches(branches, 4) == [1, 3, 0, 2]


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
    assert convert.chat_messages(req.messages) == [{"role": "user", "content": "ab",
                                                    "name": "bob"}]
    image = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with raises(grpc.StatusCode.INVALID_ARGUMENT):
        convert.chat_messages(image.messages)


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
                "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
                "INTERNAL": 500, "CANCELLED": 500, "UNKNOWN": 500}
    assert {name: http_status(grpc.StatusCode[name]) for name in expected} == expected

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return "queue full (4 waiting); retry later"
    err = from_rpc_error(Failed())
    assert err.http_status == 429 and err.message == "queue full (4 waiting); retry later"
    assert err.to_dict()["error"]["type"] == "rate_limit_error"
    resp = error_response(err)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
    assert "Retry-After" not in error_response(ApiError(grpc.StatusCode.UNAVAILABLE, "x")).headers


def test_sse_framing() -> None:
    frame = convert.sse_event({"a": "é"})
    assert frame == 'data: {"a":"é"}\n\n'
    assert convert.SSE_DONE == "data: [DONE]\n\n" and convert.SSE_PING.startswith(":")


def _call(fmt, include_usage: bool, continuous_usage: bool = False) -> sse.Call:
    backend = Backend(SPEC, InstanceRegistry([UNREACHABLE], [UNREACHABLE]), None)
    stream = RequestStream(backend, "r-1", 3, tuple(backend.registry.instances), call=None)
    return sse.Call("r-1", "tiny", 7, fmt, Choices([stream], 1, 1, False), include_usage,
                    continuous_usage)


def _out(call: sse.Call, resp: generation_pb2.GenerateResponse) -> generation_pb2.GenerateResponse:
    """`resp` read from the call's one stream, on its way out."""
    call.choices.streams[0]._observe(resp)
    call.choices.record(resp)
    return resp


def _frames(texts: list[str]) -> list[dict]:
    return [json.loads(t[len("data: "):]) for t in texts]


def test_stream_chunks_chat_with_usage() -> None:
    call = _call(sse.CHAT, include_usage=True)
    resp = generation_pb2.GenerateResponse(token_ids=[1], text="He")
    first = _frames(sse.sse_chunks(call, 0, _out(call, resp), True))
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert first[0]["usage"] is None
    assert sse.sse_chunks(call, 0, _out(call, generation_pb2.GenerateResponse(token_ids=[9])),
                          False) == []
    last = generation_pb2.GenerateResponse(
        text="", finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2))
    finish, usage = _frames(sse.sse_chunks(call, 0, _out(call, last), False))
    assert finish["choices"][0]["finish_reason"] == "stop" and "tandem_timings" in finish
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_chunks_with_continuous_usage(include_usage: bool) -> None:
    """stream_options.continuous_usage_stats: every chunk carries the usage so far; the one
    with the finish reason, the request's; include_usage adds the usage-only chunk."""
    call = _call(sse.CHAT, include_usage, continuous_usage=True)
    usages = []
    for i, resp in enumerate([generation_pb2.GenerateResponse(token_ids=[1], text="He"),
                              generation_pb2.GenerateResponse(token_ids=[2, 3], text="llo")]):
        (frame,) = _frames(sse.sse_chunks(call, 0, _out(call, resp), i == 0))
        usages.append(frame["usage"])
    assert usages == [{"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
                      for n in (1, 3)]
    last = generation_pb2.GenerateResponse(
        token_ids=[4], finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=4))
    frames = _frames(sse.sse_chunks(call, 0, _out(call, last), False))
    assert frames[0]["choices"][0]["finish_reason"] == "stop"
    assert frames[0]["usage"]["completion_tokens"] == 4
    assert len(frames) == 1 + include_usage and frames[-1]["usage"]["total_tokens"] == 7


def test_stream_chunks_completion_without_usage() -> None:
    call = _call(sse.COMPLETION, include_usage=False)
    last = generation_pb2.GenerateResponse(text="!", finish_reason=common_pb2.FINISH_REASON_LENGTH)
    (frame,) = _frames(sse.sse_chunks(call, 0, _out(call, last), True))
    assert frame["choices"][0] == {"index": 0, "text": "!", "logprobs": None,
                                   "finish_reason": "length"}
    assert "usage" not in frame


# the app over unreachable instances
@pytest.fixture(scope="module")
def unreachable_backend(tiny_tokenizer_dir: Path) -> Backend:
    return Backend(SPEC, InstanceRegistry([UNREACHABLE], [UNREACHABLE]),
                   Tokenizer.from_dir(tiny_tokenizer_dir), request_timeout_s=5.0)


@pytest.fixture(scope="module")
def client(unreachable_backend: Backend):
    with TestClient(create_app(unreachable_backend)) as c:
        yield c


def test_openapi_operation_ids_are_unique(unreachable_backend: Backend, recwarn) -> None:
    """Every operation (GET and POST /ping included) has its own operationId, and building the
    OpenAPI document warns about none (FastAPI's "Duplicate Operation ID")."""
    schema = create_app(unreachable_backend).openapi()
    assert not [str(w.message) for w in recwarn if "Duplicate Operation ID" in str(w.message)]
    ids = [operation["operationId"] for item in schema["paths"].values()
           for operation in item.values()]
    assert len(ids) == len(set(ids)), sorted(ids)
    ping = schema["paths"]["/ping"]
    assert set(ping) == {"get", "post"}
    assert ping["get"]["operationId"] != ping["post"]["operationId"]


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
    for field in ("skip_special_tokens", "include_stop_str_in_output"):
        body = {"prompt": "x", field: "sometimes"}
        assert _error(client.post("/v1/completions", json=body), 400)["param"] == field


@pytest.mark.parametrize("body,status,code", [
    ({"model": "nope", "prompt": "hi"}, 404, "model_not_found"),
    ({"prompt": ""}, 400, None), ({"prompt": []}, 400, None),
    ({"prompt": "hi", "max_tokens": 0}, 400, None),
    ({"prompt": "hi", "suffix": "!", "unknown_field": 1}, 400, "unsupported_parameter"),
    ({"prompt": "hi", "n": 0}, 400, None), ({"prompt": ["hi", ""]}, 400, None),
    ({"prompt": "hi", "logprobs": 21}, 400, None),
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


PREFILLS = [UNREACHABLE, "127.0.0.1:2"]


class _FullDecodeTier(decode_pb2_grpc.DecodeServicer):
    """A decode instance whose admission queue is full: every Generate is refused."""

    def __init__(self) -> None:
        self.prefill_addresses: list[list[str]] = []

    def Generate(self, request, context):
        self.prefill_addresses.append(list(request.prefill_addresses))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (1 waiting); retry later")


@pytest.fixture(scope="module")
def full_client(tiny_tokenizer_dir: Path):
    """The app over a real gRPC decode server that answers RESOURCE_EXHAUSTED."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tier = _FullDecodeTier()
    decode_pb2_grpc.add_DecodeServicer_to_server(tier, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    backend = Backend(SPEC, InstanceRegistry(PREFILLS, [f"127.0.0.1:{port}"]),
                      Tokenizer.from_dir(tiny_tokenizer_dir), request_timeout_s=5.0)
    try:
        with TestClient(create_app(backend)) as c:
            yield c, tier
    finally:
        server.stop(0)


@pytest.mark.parametrize("stream", [False, True])
def test_full_decode_queue_is_429_with_retry_after(full_client, stream: bool) -> None:
    # the openai client maps 429 to RateLimitError and retries it after Retry-After
    client, tier = full_client
    resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": stream})
    error = _error(resp, 429, "resource_exhausted")
    assert error["type"] == "rate_limit_error" and "queue full" in error["message"]
    assert resp.headers["Retry-After"] == "1"
    # the decode tier got every ready prefill instance: the chosen one, then the fallback
    assert sorted(tier.prefill_addresses[-1]) == sorted(PREFILLS)


def test_health_ping_models_version_and_unknown_route(client: TestClient) -> None:
    assert client.get("/health").status_code == 503
    for method in ("GET", "POST"):  # no tier answers
        resp = client.request(method, "/ping")
        assert resp.status_code == 503 and resp.content == b""
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["object"] == "list"
    assert models["data"][0]["max_model_len"] == 64
    assert client.get("/version").json()["version"]
    _error(client.get("/v1/nothing"), 404)


@pytest.mark.parametrize("path,body,param,code", [
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     "stream_options", None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]},
     "messages.0.role", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [TOOL, {"type": "retrieval"}]}, "tools.1.type", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {
                                  "name": "f", "parameters": {"type": "nope"}}}]},
     "tools.0.function.parameters", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tool_choice": "required"}, "tool_choice", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "response_format": {"type": "yaml"}},
     "response_format.type", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "guided_json": "{not json"},
     "guided_json", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "guided_choice": []},
     "guided_choice", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "guided_regex": "a+",
                         "guided_choice": ["a"]}, "guided_choice", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens", None)])
def test_request_errors_name_the_param(client: TestClient, path: str, body: dict, param: str,
                                       code: str | None) -> None:
    assert _error(client.post(path, json=body), 400, code)["param"] == param


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_detokenize(client: TestClient, tiny_tokenizer_dir: Path,
                                 prefix: str) -> None:
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    body = client.post(f"{prefix}/tokenize", json={"model": "tiny", "prompt": "hello world"})
    ids = tok.encode("hello world")
    assert body.json() == {"count": len(ids), "max_model_len": 64, "tokens": ids,
                           "token_strs": None}
    messages = [{"role": "user", "content": "hi"}]
    chat_ids = client.post(f"{prefix}/tokenize", json={"messages": messages}).json()["tokens"]
    assert chat_ids == tok.encode_chat(messages)
    text = client.post(f"{prefix}/detokenize", json={"tokens": chat_ids}).json()["prompt"]
    assert text == tok.decode(chat_ids, skip_special_tokens=False) and "<|im_start|>" in text
    _error(client.post(f"{prefix}/detokenize", json={"tokens": [1, 5000]}), 400)
    _error(client.post(f"{prefix}/tokenize", json={"model": "x", "prompt": "a"}), 404,
           "model_not_found")
    strs = client.post(f"{prefix}/tokenize",
                       json={"prompt": "hello world", "return_token_strs": True}).json()
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert strs["token_strs"] == reference.convert_ids_to_tokens(ids)
    assert None not in strs["token_strs"]


def test_cors_allows_every_origin_by_default(client: TestClient) -> None:
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    models = client.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert models.headers["access-control-allow-origin"] == "*"


# access: API key and CORS origins
KEY = "sesame"


@pytest.fixture(scope="module")
def keyed_client(tiny_tokenizer_dir: Path):
    backend = Backend(SPEC, InstanceRegistry([UNREACHABLE], [UNREACHABLE]),
                      Tokenizer.from_dir(tiny_tokenizer_dir), request_timeout_s=5.0)
    app = create_app(backend, api_key=ApiKey(KEY), allowed_origins=["https://ui.example"])
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("authorization", [None, "Bearer", "Bearer wrong", f"Basic {KEY}",
                                           f"Bearer {KEY}x", KEY])
def test_api_key_refused_under_v1(keyed_client: TestClient, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/tokenize"), ("GET", "/v1/nothing")):
        resp = keyed_client.request(method, path, headers=headers, json={"prompt": "hi"})
        error = _error(resp, 401, "invalid_api_key")
        assert error["type"] == "invalid_request_error" and KEY not in error["message"]
        assert resp.headers["www-authenticate"] == "Bearer"


def test_api_key_accepted_and_open_paths(keyed_client: TestClient) -> None:
    for scheme in ("Bearer", "bearer"):
        headers = {"Authorization": f"{scheme} {KEY}"}
        assert keyed_client.get("/v1/models", headers=headers).status_code == 200
    assert keyed_client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
    assert keyed_client.get("/version").status_code == 200
    assert keyed_client.get("/health").status_code == 503  # open: no tier answers, not a 401
    assert keyed_client.get("/ping").status_code == 503


def test_cors_with_allowed_origins_and_a_key(keyed_client: TestClient) -> None:
    """A preflight never needs the key; a 401 still carries CORS headers, so a browser UI can
    read it; other origins get none."""
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = keyed_client.options("/v1/completions",
                              headers={"Origin": "https://ui.example", **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://ui.example"
    other = keyed_client.options("/v1/completions",
                                 headers={"Origin": "https://evil.example", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    refused = keyed_client.get("/v1/models", headers={"Origin": "https://ui.example"})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://ui.example"


def test_api_key_check() -> None:
    key = ApiKey(KEY)
    key.check(f"Bearer {KEY}")
    key.check(f"BEARER {KEY}")
    for bad in (None, "", "Bearer", f"Bearer  {KEY}", f"Token {KEY}", f"Bearer {KEY[:-1]}"):
        with raises(grpc.StatusCode.UNAUTHENTICATED, "invalid_api_key"):
            key.check(bad)
    assert KEY not in repr(vars(key))
    with pytest.raises(ValueError):
        ApiKey("")


def test_access_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--prefill", "p:1", "--decode", "d:1"]
    args = parser.parse_args(base)
    assert args.allowed_origins == ["*"] and args.api_key is None
    assert api_key(args, {}) is None and api_key(args, {"TANDEM_API_KEY": "env"}) == "env"
    args = parser.parse_args([*base, "--api-key", "flag",
                              "--allowed-origins", "https://a, https://b"])
    assert api_key(args, {"TANDEM_API_KEY": "env"}) == "flag"
    assert args.allowed_origins == ["https://a", "https://b"] and origins("") == []


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
    with raises(grpc.StatusCode.UNAVAILABLE, "unavailable"):
        registry.pick(instance_pb2.ROLE_DECODE)


def test_fallbacks_are_the_other_ready_instances_least_loaded_first() -> None:
    registry = InstanceRegistry(["p1:1", "p2:1", "p3:1", "p4:1"], ["d:1"])
    p1, p2, p3, p4 = registry.prefill
    registry.acquire(p2, p2, p3)
    p4.ready = False
    assert registry.fallbacks(p1) == [p3, p2]
    assert registry.fallbacks(p3) == [p1, p2]


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


def test_the_tiers_get_the_callers_deadline_less_a_margin() -> None:
    from gateway.grpc_api import tier_timeout

    assert tier_timeout(None) is None  # the gateway's --request-timeout applies
    assert tier_timeout(2.0) == pytest.approx(1.8)  # 10% ...
    assert tier_timeout(60.0) == pytest.approx(59.5)  # ... at most 0.5 s
    assert 0 < tier_timeout(0.01) < 0.01
