"""Logprobs through `tandem serve` (the prefill tier samples the first token and sends its
logprobs with the KV, decode the rest) with the official openai client and the public gRPC API:
greedy logprobs equal transformers' log_softmax within 1e-4 (fp32) for the first token and the
later ones, streamed or not, in OpenAI's shapes; a sampled token's logprob is the raw one
(before temperature and filtering); out-of-range counts are 400s naming the parameter."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest
import torch

from protos.tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.e2e.test_sampling_params import served, tokenizer  # noqa: F401 - fixtures
from tests.reference import hf_logits

PROMPT = [7, 8, 9, 10]
NUM_TOKENS = 5
TOL = 1e-4


def reference(model_dir, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' log_softmax at each output position ([len(output), vocab])."""
    logits = hf_logits(model_dir, prompt + output[:-1])[len(prompt) - 1:]
    return torch.log_softmax(logits, dim=-1)


def grpc_generate(stub, prompt: list[int], **sampling) -> list[generation_pb2.GenerateResponse]:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=prompt),
                                             sampling=common_pb2.SamplingParams(**sampling))
    return list(stub.Generate(request, timeout=60))


def grpc_logprobs(stub, prompt, **sampling) -> tuple[list[int], list[common_pb2.TokenLogprobs]]:
    responses = grpc_generate(stub, prompt, **sampling)
    ids = [i for r in responses for i in r.token_ids]
    entries = [e for r in responses for e in r.logprobs]
    assert len(entries) == len(ids)
    return ids, entries


def check_top(pairs: list[tuple[int, float]], expected: torch.Tensor, n: int) -> None:
    """(id, logprob) most likely first, equal to the reference's top n."""
    values, ids = expected.sort(descending=True)
    assert [i for i, _ in pairs] == ids[:n].tolist()
    assert [v for _, v in pairs] == pytest.approx(values[:n].tolist(), abs=TOL)


def test_grpc_greedy_logprobs_equal_transformers_on_both_tiers(served, stub):
    ids, entries = grpc_logprobs(stub, PROMPT, max_tokens=NUM_TOKENS, temperature=0,
                                 ignore_eos=True, logprobs=5)
    expected = reference(served.model_dir, PROMPT, ids)
    assert ids == expected.argmax(dim=-1).tolist()  # greedy: the reference's argmax
    for position, (token, entry) in enumerate(zip(ids, entries)):  # 0: prefill's, then decode's
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(expected[position, token].item(), abs=TOL)
        check_top(list(zip(entry.top_token_ids, entry.top_logprobs)), expected[position], 5)
    plain = grpc_generate(stub, PROMPT, max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    assert [i for r in plain for i in r.token_ids] == ids and not any(r.logprobs for r in plain)


def test_a_sampled_tokens_logprob_is_the_raw_one(served, stub):
    """temperature, top_k and a logit_bias change which token is drawn, not its logprob."""
    ids, entries = grpc_logprobs(stub, PROMPT, max_tokens=NUM_TOKENS, temperature=1.7, top_k=20,
                                 seed=11, ignore_eos=True, logprobs=0,
                                 logit_bias={1000: 5.0})
    expected = reference(served.model_dir, PROMPT, ids)
    for position, (token, entry) in enumerate(zip(ids, entries)):
        assert (entry.token_id, list(entry.top_token_ids)) == (token, [])
        assert entry.logprob == pytest.approx(expected[position, token].item(), abs=TOL)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_logprobs(served, client, tokenizer, stream):
    kwargs = dict(model=served.model_dir.name, prompt=PROMPT, max_tokens=NUM_TOKENS,
                  temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        logprobs = {key: [v for p in parts for v in getattr(p, key)]
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    else:
        choice = client.completions.create(**kwargs).choices[0]
        logprobs, text = choice.logprobs.model_dump(), choice.text
    expected_ids = greedy_ids(served, PROMPT)
    expected = reference(served.model_dir, PROMPT, expected_ids)
    names = [tokenizer.decode([t]) for t in expected_ids]
    assert logprobs["tokens"] == names and "".join(names) == text
    assert logprobs["text_offset"] == [sum(map(len, names[:i])) for i in range(NUM_TOKENS)]
    for position, token in enumerate(expected_ids):
        assert logprobs["token_logprobs"][position] == pytest.approx(
            expected[position, token].item(), abs=TOL)
        top = logprobs["top_logprobs"][position]
        values = expected[position].sort(descending=True).values[:3].tolist()
        assert sorted(top.values(), reverse=True) == pytest.approx(values, abs=TOL)
        assert names[position] in top  # greedy: the chosen token ranks first


def greedy_ids(served, prompt: list[int]) -> list[int]:
    """The served model's greedy output ids (over gRPC, checked against transformers above)."""
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        responses = grpc_generate(generation_pb2_grpc.GenerationStub(channel), prompt,
                                  max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    return [i for r in responses for i in r.token_ids]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(served, client, tokenizer, stream):
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = httpx.post(f"{served.base_url}/tokenize", json={"messages": messages},
                        timeout=30).json()["tokens"]
    kwargs = dict(model=served.model_dir.name, messages=messages, max_tokens=NUM_TOKENS,
                  temperature=0, logprobs=True, top_logprobs=4,
                  extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        content = [e for c in chunks if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
    else:
        content = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(content) == NUM_TOKENS
    ids = greedy_ids(served, prompt)
    expected = reference(served.model_dir, prompt, ids)
    for position, (token, entry) in enumerate(zip(ids, content)):
        assert entry.token == tokenizer.decode([token])
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(expected[position, token].item(), abs=TOL)
        top = [(t.token, t.logprob) for t in entry.top_logprobs]
        values, top_ids = expected[position].sort(descending=True)
        assert [t for t, _ in top] == [tokenizer.decode([i]) for i in top_ids[:4].tolist()]
        assert [v for _, v in top] == pytest.approx(values[:4].tolist(), abs=TOL)
        assert top[0][0] == entry.token


@pytest.mark.parametrize("create,extra,param", [
    ("completions", {"logprobs": 21}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs")])
def test_out_of_range_is_a_400_naming_the_param(served, client, create, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        if create == "completions":
            client.completions.create(model=served.model_dir.name, prompt="Hi", max_tokens=2,
                                      **extra)
        else:
            client.chat.completions.create(model=served.model_dir.name, max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}], **extra)
    assert info.value.param == param


def test_grpc_out_of_range_is_invalid_argument(served, stub):
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(stub, PROMPT, max_tokens=2, logprobs=21)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprobs must be in [0, 20]" in info.value.details()
