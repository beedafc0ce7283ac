"""The HTTP conventions around generation, through one `tandem serve --api-key ...
--allowed-origins ...`: the key on /v1 (official openai client) and on the public gRPC API
(metadata), with health, /ping, /version and the unversioned /tokenize left open; CORS;
/tokenize and /detokenize against the model's tokenizer; /v1/models; max_completion_tokens;
stream_options; and min_tokens holding EOS (masked) and stop strings back across the split
tiers."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from protos.tandem.v1 import common_pb2, generation_pb2
from tests.reference import hf_model

KEY = "tandem-e2e-key"
ORIGIN = "https://ui.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
METADATA = (("authorization", f"Bearer {KEY}"),)
GENERATION = generation_pb2.DESCRIPTOR.services_by_name["Generation"]


@pytest.fixture(scope="module")
def served(tiny_models, serve_model):
    return serve_model(tiny_models["llama"], "--api-key", KEY,
                       "--allowed-origins", f"{ORIGIN},https://other.example")


@pytest.fixture
def client(served):
    yield openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0, timeout=60)
    served.assert_all_blocks_free()


@pytest.fixture
def http(served):
    """No key: each request adds AUTH where it needs it."""
    with httpx.Client(base_url=f"http://127.0.0.1:{served.http_port}", timeout=60) as http:
        yield http


def generate(stub, prompt: list[int], **sampling) -> list[generation_pb2.GenerateResponse]:
    """Every response of a greedy gRPC Generate of the token-id prompt (with the key)."""
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(temperature=0, **sampling))
    return list(stub.Generate(request, metadata=METADATA, timeout=60))


def model_info(stub) -> generation_pb2.ModelInfo:
    return stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), metadata=METADATA, timeout=10)


def ids_of(responses) -> list[int]:
    return [i for r in responses for i in r.token_ids]


# auth
def test_openai_client_needs_the_key(served, client):
    model = served.model_dir.name
    other = openai.OpenAI(base_url=served.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        other.completions.create(model=model, prompt="hi", max_tokens=2)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        other.models.list()
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage
    assert [m.id for m in client.models.list()] == [model]


def test_health_ping_version_and_unversioned_tokenize_stay_open(http):
    assert http.get("/health").status_code == 200
    for method in ("GET", "POST"):
        ping = http.request(method, "/ping")
        assert ping.status_code == 200 and ping.content == b""
    assert http.get("/version").json()["version"]
    assert http.post("/tokenize", json={"prompt": "hi"}).status_code == 200
    for path in ("/v1/tokenize", "/v1/detokenize"):
        refused = http.post(path, json={"prompt": "hi", "tokens": [1]})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_grpc_generation_needs_the_key_health_and_reflection_do_not(served, stub):
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        for method in GENERATION.methods:  # every RPC, so a new one cannot forget the check
            call = _generic_call(channel, method)
            request_type = getattr(generation_pb2, method.input_type.name)
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
                with pytest.raises(grpc.RpcError) as info:
                    result = call(request_type(), metadata=metadata, timeout=10)
                    if method.server_streaming:
                        list(result)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert GENERATION.full_name in {s.name for s in listed.list_services_response.service}
    assert model_info(stub).name == served.model_dir.name
    assert ids_of(generate(stub, [11, 12, 13], max_tokens=3, ignore_eos=True))


def _generic_call(channel: grpc.Channel, method):
    """A callable for one Generation RPC, from its descriptor."""
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    request, response = (getattr(generation_pb2, t.name)
                         for t in (method.input_type, method.output_type))
    return kind(f"/{GENERATION.full_name}/{method.name}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString)


def test_the_key_is_on_no_command_line_and_in_no_log(served):
    """`tandem serve` hands the key to the gateway in its environment: `ps` shows no key."""
    children = _command_lines_of_children(served.proc.pid)
    assert any(" gateway " in c for c in children), children
    assert not any(KEY in c for c in children)
    assert KEY not in "".join(served.output)


def _command_lines_of_children(pid: int) -> list[str]:
    """The command lines of `pid`'s child processes (Linux /proc)."""
    lines = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat, cmdline = (proc / "stat").read_text(), (proc / "cmdline").read_bytes()
        except OSError:  # it exited meanwhile
            continue
        if stat.rsplit(")", 1)[1].split()[1] == str(pid):  # "pid (comm) state ppid ..."
            lines.append(cmdline.replace(b"\0", b" ").decode())
    return lines


# CORS
def test_cors_preflight_and_response_headers(http):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = http.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = http.options("/v1/chat/completions",
                           headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers
    models = http.get("/v1/models", headers={"Origin": ORIGIN, **AUTH})
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == ORIGIN


# tokenizer endpoints and models
def test_tokenize_and_detokenize_equal_the_tokenizer(served, http):
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    text = "The decode tier streams tokens 🚀 über alles"
    expected = tokenizer(text).input_ids
    max_model_len = http.get("/v1/models", headers=AUTH).json()["data"][0]["max_model_len"]
    assert max_model_len > 0
    for prefix in ("", "/v1"):
        body = http.post(f"{prefix}/tokenize", headers=AUTH,
                         json={"model": served.model_dir.name, "prompt": text}).json()
        assert body == {"count": len(expected), "max_model_len": max_model_len,
                        "tokens": expected, "token_strs": None}
        detok = http.post(f"{prefix}/detokenize", headers=AUTH, json={"tokens": expected})
        assert detok.json() == {"prompt": tokenizer.decode(expected)}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


# request conventions
def test_max_completion_tokens_wins_and_stream_options_need_stream(served, client):
    messages = [{"role": "user", "content": "Hi"}]
    result = client.chat.completions.create(
        model=served.model_dir.name, messages=messages, max_tokens=3, max_completion_tokens=5,
        temperature=0, extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 5 and result.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=served.model_dir.name, prompt="hi", max_tokens=2,
                                  stream_options={"include_usage": True})
    assert info.value.param == "stream_options"


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "file_search"}]}, "tools.0.type"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true, as OpenAI
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages.0.role")])
def test_what_cannot_be_honoured_is_a_400_naming_it(served, client, extra, param):
    request = {"model": served.model_dir.name, "max_tokens": 2,
               "messages": [{"role": "user", "content": "Hi"}], **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert info.value.param == param


def test_no_op_values_and_unknown_fields_pass(served, client):
    """Values that change nothing are accepted, and unknown fields ignored (never a 422)."""
    ok = client.chat.completions.create(
        model=served.model_dir.name, max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
        tools=[], tool_choice="none", response_format={"type": "text"}, logit_bias={},
        extra_body={"unknown_field": {"nested": 1}})
    assert ok.usage.completion_tokens >= 1


def test_continuous_usage_stats(served, client):
    chunks = list(client.completions.create(
        model=served.model_dir.name, prompt=[7, 8, 9], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}))
    *content, last = chunks
    counts = [c.usage.completion_tokens for c in content]
    assert all(c.usage.prompt_tokens == 3 and c.usage.total_tokens == 3 + count
               for c, count in zip(content, counts))
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert last.choices == [] and last.usage.completion_tokens == 6


# min_tokens across the tiers
def _prompt_whose_first_token_is_eos(model_dir: Path, eos_ids: set[int]) -> int:
    """A one-token prompt whose greedy next token is an EOS (found over the whole vocabulary
    in one batched forward pass): the prefill tier samples that EOS."""
    model = hf_model(model_dir)
    with torch.no_grad():
        vocab = torch.arange(model.config.vocab_size)
        greedy = model(vocab[:, None]).logits[:, -1].argmax(-1)
    hits = [t for t, g in zip(vocab.tolist(), greedy.tolist()) if g in eos_ids]
    assert hits, "no one-token prompt of the tiny model ends at once: pick a longer search"
    return hits[0]


def test_min_tokens_holds_eos_back_across_tiers(served, client, stub):
    """EOS is masked until min_tokens tokens exist (as vLLM), the prefill tier's first token
    included: the output is greedy with EOS biased away for min_tokens tokens, then greedy
    until an EOS ends it."""
    eos_ids = set(model_info(stub).eos_token_ids)
    prompt = [_prompt_whose_first_token_is_eos(served.model_dir, eos_ids)]
    model = served.model_dir.name
    eager = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert eager.usage.completion_tokens == 1 and eager.choices[0].finish_reason == "stop"
    min_tokens = 4
    held_back = ids_of(generate(stub, prompt, max_tokens=min_tokens, ignore_eos=True,
                                logit_bias={eos: -100 for eos in eos_ids}))
    expected = held_back + ids_of(generate(stub, prompt + held_back, max_tokens=8 - min_tokens))
    assert not set(held_back) & eos_ids
    assert ids_of(generate(stub, prompt, max_tokens=8, min_tokens=min_tokens)) == expected
    held = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"min_tokens": min_tokens})
    assert held.usage.completion_tokens == len(expected) > min_tokens
    assert held.choices[0].finish_reason == ("stop" if expected[-1] in eos_ids else "length")


def test_min_tokens_holds_stop_strings_back(served, client, stub):
    """Stop strings are looked for only in the text after the first min_tokens tokens."""
    prompt = [7, 8, 9]
    responses = generate(stub, prompt, max_tokens=20, ignore_eos=True)
    full, num_tokens, marks = "", 0, []  # (tokens so far, characters streamed by then)
    for r in responses:
        full, num_tokens = full + r.text, num_tokens + len(r.token_ids)
        marks.append((num_tokens, len(full)))
    min_tokens, offset = next((n, k) for n, k in marks if k >= 5)
    # a stop string within the first min_tokens tokens' text that comes again after it
    stop = next((full[i:i + 2] for i in range(offset - 1) if "\ufffd" not in full[i:i + 2]
                 and full.find(full[i:i + 2], offset) >= 0), None)
    assert stop, f"no stop string to test with in {full!r}"
    model = served.model_dir.name
    kwargs = dict(model=model, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    early = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert early.choices[0].text == full[:full.index(stop)]
    held = client.completions.create(**kwargs, extra_body={"ignore_eos": True,
                                                           "min_tokens": min_tokens})
    assert held.choices[0].text == full[:full.find(stop, offset)]
    assert held.choices[0].finish_reason == "stop"
