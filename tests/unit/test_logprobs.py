"""Logprobs in the sampler and the runner's step: the model's raw log_softmax (before bias,
penalties, temperature and filtering), the chosen token always, the top N by logprob in a fixed
order (ties by ascending id), independent of the batch, and no work at all for rows that did not
ask. The gateway's OpenAI shapes of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.request import Request
from engine.sampler import sample, sample_with_logprobs
from engine.sampling_params import InvalidSamplingParam, SamplingParams, TokenLogprobs
from engine.tokenizer import Tokenizer
from gateway import convert, sse
from gateway.backend import Backend, RequestStream
from gateway.choices import Choices
from gateway.errors import ApiError
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.routing import InstanceRegistry
from protos.tandem.v1 import common_pb2, decode_pb2, generation_pb2

VOCAB = 64


def request(logprobs: int | None = None, **sampling) -> Request:
    sampling.setdefault("temperature", 0.0)  # greedy unless told
    return Request("r", [1, 2, 3], SamplingParams(max_tokens=4, logprobs=logprobs, **sampling))


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_logprobs_are_the_raw_log_softmax_with_the_chosen_token_and_the_top_n():
    logits = logits_rows(4)
    requests = [request(5), request(0, temperature=0.7, seed=3, top_k=8, top_p=0.9),
                request(20, logit_bias=((7, 100.0),), repetition_penalty=1.5),
                request(3, temperature=1.3, seed=1, min_p=0.1, presence_penalty=1.0)]
    tokens, logprobs = sample_with_logprobs(logits, requests)
    reference = torch.log_softmax(logits, dim=-1)
    assert tokens[2] == 7  # the bias decided the token, not the logprobs
    for row, (token, entry) in enumerate(zip(tokens, logprobs)):
        n = requests[row].sampling.logprobs
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(reference[row, token].item(), abs=1e-6)
        values, ids = reference[row].sort(descending=True)
        assert list(entry.top_token_ids) == ids[:n].tolist()
        assert list(entry.top_logprobs) == pytest.approx(values[:n].tolist(), abs=1e-6)


def test_ties_are_ordered_by_ascending_id_and_the_tokens_are_unchanged():
    logits = torch.zeros(1, VOCAB)
    logits[0, [40, 9, 30]] = 2.0  # three tied maxima
    logits[0, 50] = 1.0
    entry = sample_with_logprobs(logits, [request(4)]).logprobs[0]
    assert entry.token_id == 9  # greedy: the first maximum
    assert entry.top_token_ids == (9, 30, 40, 50)
    assert entry.top_logprobs[0] == entry.top_logprobs[1] == entry.top_logprobs[2]
    assert entry.top_logprobs[2] > entry.top_logprobs[3]


def test_a_batch_gives_each_row_what_it_gets_alone():
    logits = logits_rows(6, seed=1)
    requests = [request(n, temperature=t, seed=i) for i, (n, t) in
                enumerate([(2, 0.0), (None, 1.0), (7, 0.8), (None, 0.0), (0, 1.0), (20, 0.5)])]
    together = sample_with_logprobs(logits, requests)
    for row, req in enumerate(requests):
        alone = sample_with_logprobs(logits[row:row + 1], [req])
        assert (alone.tokens[0], alone.logprobs[0]) == (together.tokens[row],
                                                        together.logprobs[row])
    assert together.logprobs[1] is None and together.logprobs[3] is None


def test_rows_that_did_not_ask_cost_nothing(monkeypatch):
    """No log_softmax, no topk, no extra transfer: the tokens are what `sample` gives."""
    logits = logits_rows(3, seed=2)
    requests = [request(), request(temperature=0.9, seed=5), request(top_p=0.5, seed=6,
                                                                       temperature=1.0)]
    expected = sample(logits, requests)
    calls = []
    for name in ("log_softmax", "topk"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(*a, **k))
    result = sample_with_logprobs(logits, requests)
    assert result.tokens == expected and result.logprobs == [None] * 3 and calls == []


def test_a_failed_row_has_no_logprobs_and_the_others_do():
    logits = logits_rows(2, seed=3)
    logits[0, 5] = float("nan")
    result = sample_with_logprobs(logits, [request(2), request(2)])
    assert result.logprobs[0] is None and result.logprobs[1].token_id == result.tokens[1]


def test_the_range_is_0_to_20():
    assert SamplingParams(max_tokens=1, logprobs=20).validate().logprobs == 20
    with pytest.raises(InvalidSamplingParam) as info:
        SamplingParams(max_tokens=1, logprobs=21).validate()
    assert info.value.param == "logprobs"
    params = SamplingParams(max_tokens=1, logprobs=0)
    assert SamplingParams.from_pb(params.to_pb()) == params
    assert not SamplingParams(max_tokens=1).to_pb().HasField("logprobs")
    entry = TokenLogprobs(3, -0.5, (3, 4), (-0.5, -1.25))
    assert TokenLogprobs.from_pb(entry.to_pb()) == entry


# the gateway
def _request_logprobs(req) -> int | None:
    spec = convert.ModelSpec("tiny", 64, VOCAB, (2,), "LlamaForCausalLM")
    sp = convert.sampling_from_request(req, 3, spec)
    return sp.logprobs if sp.HasField("logprobs") else None


@pytest.mark.parametrize("make,fields,expected", [
    (CompletionRequest, {"logprobs": 0}, 0), (CompletionRequest, {"logprobs": 20}, 20),
    (CompletionRequest, {}, None), (ChatCompletionRequest, {"logprobs": True}, 0),
    (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 5}, 5),
    (ChatCompletionRequest, {"logprobs": False}, None)])
def test_requests_map_to_the_sampling_count(make, fields, expected):
    body = {"prompt": [1]} if make is CompletionRequest else {
        "messages": [{"role": "user", "content": "x"}]}
    assert _request_logprobs(make(max_tokens=2, **body, **fields)) == expected


@pytest.mark.parametrize("make,fields,param", [
    (CompletionRequest, {"logprobs": 21}, "logprobs"),
    (CompletionRequest, {"logprobs": -1}, "logprobs"),
    (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (ChatCompletionRequest, {"top_logprobs": 2}, "top_logprobs"),
    (ChatCompletionRequest, {"logprobs": False, "top_logprobs": 0}, "top_logprobs")])
def test_bad_counts_are_400s_naming_the_param(make, fields, param):
    body = {"prompt": [1]} if make is CompletionRequest else {
        "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(ApiError) as info:
        _request_logprobs(make(max_tokens=2, **body, **fields))
    assert (info.value.http_status, info.value.param) == (400, param)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def test_openai_shapes(tokenizer):
    entries = [common_pb2.TokenLogprobs(token_id=300, logprob=-0.25, top_token_ids=[301, 300],
                                        top_logprobs=[-0.2, -0.25]),
               common_pb2.TokenLogprobs(token_id=302, logprob=float("-inf"))]
    text = [convert.token_text(tokenizer, t) for t in (300, 301, 302)]
    completion = convert.completion_logprobs(entries, tokenizer, text_offset=4)
    assert completion == {
        "tokens": [text[0], text[2]], "token_logprobs": [-0.25, convert.MIN_LOGPROB],
        "top_logprobs": [{text[1]: pytest.approx(-0.2), text[0]: -0.25},
                         {text[2]: convert.MIN_LOGPROB}],
        "text_offset": [4, 4 + len(text[0])]}
    chat = convert.chat_logprobs(entries, tokenizer)["content"]
    assert chat[0]["token"] == text[0] and chat[0]["bytes"] == list(text[0].encode())
    assert [e["token"] for e in chat[0]["top_logprobs"]] == [text[1], text[0]]
    assert chat[1]["top_logprobs"] == [] and chat[1]["logprob"] == convert.MIN_LOGPROB


def _call(fmt: sse.Format, tokenizer: Tokenizer, logprobs: int | None) -> sse.Call:
    spec = convert.ModelSpec("tiny", 64, VOCAB, (2,), "LlamaForCausalLM")
    backend = Backend(spec, InstanceRegistry(["127.0.0.1:1"], ["127.0.0.1:1"]), tokenizer)
    sampling = common_pb2.SamplingParams(max_tokens=4)
    if logprobs is not None:
        sampling.logprobs = logprobs
    request = decode_pb2.DecodeRequest(request_id="r", prompt_token_ids=[1], sampling=sampling)
    stream = RequestStream(backend, "r", 1, tuple(backend.registry.instances), None, request)
    return sse.Call("r", "tiny", 7, fmt, Choices([stream], 1, 1, logprobs is not None),
                    False, False)


def _out(call: sse.Call, resp: generation_pb2.GenerateResponse) -> generation_pb2.GenerateResponse:
    call.choices.streams[0]._observe(resp)
    call.choices.record(resp)
    return resp


def _choices(call: sse.Call, responses) -> list[dict]:
    frames = []
    for i, resp in enumerate(responses):
        frames += [json.loads(f[len("data: "):])
                   for f in sse.sse_chunks(call, 0, _out(call, resp), i == 0)]
    return [f["choices"][0] for f in frames]


def _responses():
    entry = [common_pb2.TokenLogprobs(token_id=t, logprob=-1.0 * t / 100) for t in (300, 301, 302)]
    return [generation_pb2.GenerateResponse(token_ids=[300], text="a", logprobs=entry[:1]),
            # a token whose text is held back (part of a character): its chunk still comes
            generation_pb2.GenerateResponse(token_ids=[301], text="", logprobs=entry[1:2]),
            generation_pb2.GenerateResponse(token_ids=[302], text="b", logprobs=entry[2:],
                                            finish_reason=common_pb2.FINISH_REASON_LENGTH)]


def test_streamed_completion_chunks_carry_their_tokens_logprobs(tokenizer):
    call = _call(sse.COMPLETION, tokenizer, 0)
    choices = _choices(call, _responses())
    texts = [convert.token_text(tokenizer, t) for t in (300, 301, 302)]
    assert [c["logprobs"]["tokens"] for c in choices] == [[t] for t in texts]
    assert [c["logprobs"]["text_offset"] for c in choices] == [
        [0], [len(texts[0])], [len(texts[0]) + len(texts[1])]]
    whole = _call(sse.COMPLETION, tokenizer, 0)
    for resp in _responses():
        _out(whole, resp)
    body = whole.body("ab", "length")["choices"][0]["logprobs"]  # the non-streamed response
    assert body["tokens"] == texts and body["token_logprobs"] == pytest.approx([-3.0, -3.01, -3.02])


def test_streamed_chat_chunks_carry_their_tokens_logprobs_and_none_unasked(tokenizer):
    choices = _choices(_call(sse.CHAT, tokenizer, 2), _responses())
    assert [len(c["logprobs"]["content"]) for c in choices] == [1, 1, 1]
    plain = _choices(_call(sse.CHAT, tokenizer, None), [
        generation_pb2.GenerateResponse(token_ids=[300], text="a"),
        generation_pb2.GenerateResponse(token_ids=[301], text="")])
    assert [c["logprobs"] for c in plain] == [None]  # no logprobs, no empty chunk
