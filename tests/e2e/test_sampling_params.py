"""The logits processors through `tandem serve` (prefill samples the first token, decode the
rest), with the official openai client and the public gRPC API: logit_bias forces a token;
repetition_penalty equals transformers generate(); presence / frequency penalties equal a greedy
reference over transformers' logits; min_p of 1 is greedy; out-of-range values are 400s naming
the parameter."""

from __future__ import annotations

from collections import Counter

import grpc
import openai
import pytest
import torch
from transformers import AutoTokenizer

from protos.tandem.v1 import common_pb2, generation_pb2
from tests.reference import hf_model

# a prompt whose unpenalised greedy output repeats tokens within 16 (the tiny llama, seed 0)
REPEATING_PROMPT = [721]
FORCED = 1000  # an ordinary token of the tiny tokenizer


@pytest.fixture(scope="module")
def served(tiny_models, serve_model):
    return serve_model(tiny_models["llama"])


@pytest.fixture(scope="module")
def tokenizer(served):
    return AutoTokenizer.from_pretrained(served.model_dir)


def grpc_ids(stub, prompt: list[int], **sampling) -> list[int]:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=prompt),
                                             sampling=common_pb2.SamplingParams(**sampling))
    return [i for r in stub.Generate(request, timeout=60) for i in r.token_ids]


def complete(client, served, prompt, **kwargs) -> openai.types.Completion:
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=served.model_dir.name, prompt=prompt, **kwargs)


def reference_greedy(model_dir, prompt: list[int], num_tokens: int, presence: float,
                     frequency: float) -> list[int]:
    """Greedy over transformers' logits, penalised one token at a time (OpenAI's formula)."""
    model = hf_model(model_dir)
    output: list[int] = []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([prompt + output])).logits[0, -1]
            for token, count in Counter(output).items():
                logits[token] -= frequency * count + presence
            output.append(int(logits.argmax()))
    return output


def test_logit_bias_forces_the_token_on_both_tiers(served, client, stub, tokenizer):
    forced = tokenizer.decode([FORCED] * 5)
    greedy = complete(client, served, [7, 8, 9], max_tokens=5, logit_bias={str(FORCED): 100})
    assert greedy.choices[0].text == forced and greedy.usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model=served.model_dir.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
        temperature=1.0, seed=3, logit_bias={str(FORCED): 100})
    assert chat.choices[0].message.content == forced
    assert grpc_ids(stub, [7, 8, 9], max_tokens=5, seed=4, logit_bias={FORCED: 100}) == [FORCED] * 5


def test_repetition_penalty_equals_transformers_and_stops_repeats(served, client, stub):
    kwargs = dict(max_tokens=16, temperature=0, ignore_eos=True)
    plain = grpc_ids(stub, REPEATING_PROMPT, **kwargs)
    assert len(set(plain)) < len(plain), "the unpenalised output should repeat: pick a prompt"
    penalised = grpc_ids(stub, REPEATING_PROMPT, repetition_penalty=3.0, **kwargs)
    with torch.no_grad():
        expected = hf_model(served.model_dir).generate(
            torch.tensor([REPEATING_PROMPT]), max_new_tokens=16, do_sample=False,
            repetition_penalty=3.0, eos_token_id=None, pad_token_id=0)[0, 1:].tolist()
    assert penalised == expected
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(REPEATING_PROMPT)


def test_presence_and_frequency_penalties_equal_the_reference(served, client, tokenizer):
    expected = reference_greedy(served.model_dir, REPEATING_PROMPT, 12, presence=1.5,
                                frequency=0.75)
    result = complete(client, served, REPEATING_PROMPT, max_tokens=12, presence_penalty=1.5,
                      frequency_penalty=0.75, extra_body={"ignore_eos": True})
    assert result.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_min_p_of_one_at_temperature_one_is_greedy(served, client):
    greedy = complete(client, served, [11, 12, 13], max_tokens=8, extra_body={"ignore_eos": True})
    for _ in range(2):  # unseeded: any draw must be the argmax
        sampled = complete(client, served, [11, 12, 13], max_tokens=8, temperature=1.0,
                           extra_body={"min_p": 1.0, "ignore_eos": True})
        assert sampled.choices[0].text == greedy.choices[0].text


@pytest.mark.parametrize("extra,param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"), ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 150}}, "logit_bias")])
def test_out_of_range_is_a_400_naming_the_param(served, client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=served.model_dir.name, max_tokens=2,
                                       messages=[{"role": "user", "content": "Hi"}], **extra)
    assert info.value.param == param and info.value.body["type"] == "invalid_request_error"


def test_grpc_out_of_range_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as info:
        grpc_ids(stub, [7, 8], max_tokens=2, min_p=1.5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_p" in info.value.details()
