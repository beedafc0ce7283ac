"""The logits processors through `tandem serve` (prefill samples the first token, decode the
rest), with the official openai client and the public gRPC API: logit_bias forces a token;
repetition_penalty equals transformers generate(); presence / frequency penalties equal a greedy
reference over transformers' logits; min_p of 1 is greedy; out-of-range values are 400s naming
the parameter. The output text flags skip_special_tokens and include_stop_str_in_output, streamed
and not, over HTTP (completions, chat) and gRPC."""

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


def grpc_generate(stub, prompt: list[int], **sampling) -> list[generation_pb2.GenerateResponse]:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=prompt),
                                             sampling=common_pb2.SamplingParams(**sampling))
    return list(stub.Generate(request, timeout=60))


def grpc_ids(stub, prompt: list[int], **sampling) -> list[int]:
    return [i for r in grpc_generate(stub, prompt, **sampling) for i in r.token_ids]


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


# Output text flags (vLLM extras): skip_special_tokens and include_stop_str_in_output.


def texts(client, served, chat: bool, **kwargs) -> tuple[str, str, str]:
    """(text, streamed text, finish reason) of one greedy request, asked twice."""
    kwargs.update(model=served.model_dir.name, temperature=0)
    if chat:
        create = client.chat.completions.create
        kwargs["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        create, kwargs["prompt"] = client.completions.create, kwargs.get("prompt", [7, 8, 9])
    whole = create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in create(stream=True, **kwargs) if c.choices]
    piece = (lambda c: c.delta.content or "") if chat else (lambda c: c.text)
    text = whole.message.content if chat else whole.text
    return text, "".join(piece(c) for c in chunks), whole.finish_reason


def grpc_text(stub, prompt: list[int], **sampling) -> str:
    return "".join(r.text for r in grpc_generate(stub, prompt, **sampling))


@pytest.mark.parametrize("chat", [False, True])
def test_skip_special_tokens_false_keeps_their_text(served, client, stub, tokenizer, chat):
    """A forced special token (<|im_start|>, not a stop token) shows only with
    skip_special_tokens=false; streamed and whole alike; the token ids do not change."""
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special in tokenizer.all_special_ids
    bias = {"max_tokens": 3, "logit_bias": {str(special): 100}}
    assert texts(client, served, chat, **bias)[:2] == ("", "")
    kept = texts(client, served, chat, extra_body={"skip_special_tokens": False}, **bias)
    assert kept == ("<|im_start|>" * 3,) * 2 + ("length",)
    grpc_bias = {"max_tokens": 3, "logit_bias": {special: 100}}
    assert grpc_text(stub, [7, 8], **grpc_bias) == ""
    assert grpc_text(stub, [7, 8], skip_special_tokens=False, **grpc_bias) == "<|im_start|>" * 3


def test_include_stop_str_in_output_ends_the_text_with_the_stop(served, client, stub):
    """The greedy text cut before a stop string by default, after it with the flag; streamed and
    whole alike (the stop string spans tokens or not, as the tiny model writes it)."""
    plain = {"max_tokens": 12, "extra_body": {"ignore_eos": True}}
    full = texts(client, served, False, **plain)[0]
    stop = full[5:8]
    start = full.index(stop)
    assert stop.strip() and start + len(stop) < len(full), f"pick another stop in {full!r}"
    assert texts(client, served, False, stop=[stop], **plain) == (full[:start],) * 2 + ("stop",)
    kept = texts(client, served, False, stop=[stop], max_tokens=12,
                 extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept == (full[:start + len(stop)],) * 2 + ("stop",)
    assert grpc_text(stub, [7, 8, 9], max_tokens=12, temperature=0, ignore_eos=True,
                     stop=[stop], include_stop_str_in_output=True) == full[:start + len(stop)]


@pytest.mark.parametrize("chat", [False, True])
def test_a_stop_token_text_shows_only_when_included_and_not_skipped(served, client, tokenizer,
                                                                    chat):
    """As vLLM: the EOS text is left out unless include_stop_str_in_output, and then, EOS being
    special, only with skip_special_tokens=false."""
    bias = {"max_tokens": 4, "logit_bias": {str(tokenizer.eos_token_id): 100}}
    for extra, expected in [({"skip_special_tokens": False}, ""),
                            ({"include_stop_str_in_output": True}, ""),
                            ({"skip_special_tokens": False, "include_stop_str_in_output": True},
                             tokenizer.eos_token)]:
        assert texts(client, served, chat, extra_body=extra, **bias) == (expected, expected,
                                                                         "stop"), extra
