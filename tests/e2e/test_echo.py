"""`echo` and prompt logprobs through `tandem serve` (the prefill tier computes the prompt's
logprobs and sends them with the KV), with the official openai client and the public gRPC API:
the text starts with the prompt, streamed or not; the prompt tokens' logprobs equal
transformers' log_softmax within 1e-4 (fp32), the first token's null, text_offset counting
across prompt and completion; a prompt whose blocks are in the prefix cache gives the same
values (such a request takes no hits); max_tokens 0 with echo scores the prompt alone; vLLM's
prompt_logprobs; 400s naming the parameter."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest
import torch

from protos.tandem.v1 import common_pb2, generation_pb2
from tests.e2e.test_logprobs import NUM_TOKENS, TOL, greedy_ids, grpc_generate, reference
from tests.e2e.test_sampling_params import served, tokenizer  # noqa: F401 - fixtures
from tests.reference import hf_logits, prompt_ids

# longer than two KV blocks, so a repeat of it is a prefix-cache candidate
PROMPT = prompt_ids(8, 40, 2000)


def prompt_reference(model_dir, prompt: list[int]) -> torch.Tensor:
    """transformers' log_softmax at each prompt position but the last ([len - 1, vocab]): row i
    scores prompt token i + 1."""
    return torch.log_softmax(hf_logits(model_dir, prompt)[:-1], dim=-1)


def create(client, served, stream: bool, **kwargs) -> tuple[str, dict | None, str | None]:
    """(text, logprobs as lists, finish_reason) of a completion, its chunks joined if streamed."""
    kwargs = dict(model=served.model_dir.name, temperature=0, **kwargs)
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        logprobs = choice.logprobs.model_dump() if choice.logprobs else None
        return choice.text, logprobs, choice.finish_reason
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    logprobs = {key: [v for p in parts for v in getattr(p, key)]
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert len(finish) == 1
    return "".join(c.choices[0].text for c in chunks), logprobs if parts else None, finish[0]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_before_the_completion(served, client, stream):
    plain, _, _ = create(client, served, False, prompt="Once upon a time", max_tokens=NUM_TOKENS)
    text, logprobs, _ = create(client, served, stream, prompt="Once upon a time", echo=True,
                               max_tokens=NUM_TOKENS)
    assert text == "Once upon a time" + plain and logprobs is None


def check_prompt_part(logprobs: dict, expected: torch.Tensor, names: list[str], n: int) -> None:
    """The echoed prompt's entries: the first null, then the reference's, top n each."""
    assert logprobs["tokens"][:len(names)] == names
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i in range(1, len(names)):
        token = PROMPT[i]
        assert logprobs["token_logprobs"][i] == pytest.approx(expected[i - 1, token].item(),
                                                              abs=TOL)
        top = logprobs["top_logprobs"][i]
        values = expected[i - 1].sort(descending=True).values[:n].tolist()
        assert sorted(top.values(), reverse=True)[:n] == pytest.approx(values, abs=TOL)
        assert len(top) <= n + 1  # the top n, and the prompt's token when it is not there
        if "\ufffd" not in names[i]:  # pieces of a UTF-8 character share one text
            assert top[names[i]] == pytest.approx(expected[i - 1, token].item(), abs=TOL)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_covers_the_prompt_tokens(served, client, tokenizer, stream):
    text, logprobs, _ = create(client, served, stream, prompt=PROMPT, echo=True, logprobs=3,
                               max_tokens=NUM_TOKENS, extra_body={"ignore_eos": True})
    names = [tokenizer.decode([t]) for t in PROMPT]
    check_prompt_part(logprobs, prompt_reference(served.model_dir, PROMPT), names, 3)
    output = greedy_ids(served, PROMPT)
    expected = reference(served.model_dir, PROMPT, output)
    completion = logprobs["token_logprobs"][len(PROMPT):]
    assert len(completion) == NUM_TOKENS
    assert completion == pytest.approx([expected[i, t].item() for i, t in enumerate(output)],
                                       abs=TOL)
    tokens = logprobs["tokens"]
    assert tokens[len(PROMPT):] == [tokenizer.decode([t]) for t in output]
    assert logprobs["text_offset"] == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    assert text == tokenizer.decode(PROMPT) + tokenizer.decode(output)


def test_prompt_logprobs_are_the_same_when_the_prompt_is_cached(served, client, stub):
    """A request asking for prompt logprobs computes every position even when the prefix cache
    holds the prompt's blocks (a hit would leave positions without logprobs)."""
    grpc_generate(stub, PROMPT, max_tokens=1)  # its full blocks enter the prefill cache
    runs = [create(client, served, False, prompt=PROMPT, echo=True, logprobs=2, max_tokens=2)[1]
            for _ in range(2)]
    assert runs[0]["tokens"] == runs[1]["tokens"]
    assert runs[0]["token_logprobs"][0] is None
    assert runs[0]["token_logprobs"][1:] == pytest.approx(runs[1]["token_logprobs"][1:], abs=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt_alone(served, client, tokenizer, stream):
    """lm-eval's loglikelihood request: echo, logprobs and max_tokens 0 (OpenAI and vLLM)."""
    text, logprobs, finish = create(client, served, stream, prompt=PROMPT, echo=True,
                                    logprobs=1, max_tokens=0)
    names = [tokenizer.decode([t]) for t in PROMPT]
    assert text == tokenizer.decode(PROMPT) and finish in ("length", "stop")
    assert len(logprobs["tokens"]) == len(PROMPT)
    check_prompt_part(logprobs, prompt_reference(served.model_dir, PROMPT), names, 1)


def test_vllm_prompt_logprobs(served, client, tokenizer):
    choice = client.completions.create(model=served.model_dir.name, prompt=PROMPT, max_tokens=2,
                                       extra_body={"prompt_logprobs": 2}).choices[0]
    entries = choice.model_extra["prompt_logprobs"]
    expected = prompt_reference(served.model_dir, PROMPT)
    assert entries[0] is None and len(entries) == len(PROMPT) and choice.logprobs is None
    for i, entry in enumerate(entries[1:], 1):
        values, ids = expected[i - 1].sort(descending=True)
        ranked = {int(t): e["rank"] for t, e in entry.items() if e["rank"] is not None}
        assert ranked == {ids[0].item(): 1, ids[1].item(): 2}
        own = entry[str(PROMPT[i])]
        assert own["logprob"] == pytest.approx(expected[i - 1, PROMPT[i]].item(), abs=TOL)
        assert own["decoded_token"] == tokenizer.decode([PROMPT[i]])


@pytest.mark.parametrize("stream", [False, True])
def test_chat_prompt_logprobs_are_the_templated_prompts(served, client, stream):
    """vLLM's chat extra: the response's (first chunk's) top-level prompt_logprobs, over the
    ids the chat template gives."""
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = httpx.post(f"{served.base_url}/tokenize", json={"messages": messages},
                        timeout=30).json()["tokens"]
    kwargs = dict(model=served.model_dir.name, messages=messages, max_tokens=2,
                  extra_body={"prompt_logprobs": 0})
    if stream:
        response = next(iter(client.chat.completions.create(stream=True, **kwargs)))
    else:
        response = client.chat.completions.create(**kwargs)
    entries = response.model_extra["prompt_logprobs"]
    expected = prompt_reference(served.model_dir, prompt)
    assert entries[0] is None and len(entries) == len(prompt)
    for i, entry in enumerate(entries[1:], 1):
        assert list(entry) == [str(prompt[i])]
        assert entry[str(prompt[i])]["logprob"] == pytest.approx(expected[i - 1, prompt[i]].item(),
                                                                 abs=TOL)


def test_grpc_prompt_logprobs_on_the_first_message(served, stub):
    responses = grpc_generate(stub, PROMPT, max_tokens=3, temperature=0, ignore_eos=True,
                              prompt_logprobs=4)
    assert [len(r.prompt_logprobs) for r in responses][1:] == [0] * (len(responses) - 1)
    entries = responses[0].prompt_logprobs
    expected = prompt_reference(served.model_dir, PROMPT)
    assert [e.token_id for e in entries] == PROMPT[1:]
    for i, entry in enumerate(entries):
        values, ids = expected[i].sort(descending=True)
        assert entry.logprob == pytest.approx(expected[i, PROMPT[i + 1]].item(), abs=TOL)
        assert list(entry.top_token_ids) == ids[:4].tolist()
        assert list(entry.top_logprobs) == pytest.approx(values[:4].tolist(), abs=TOL)


@pytest.mark.parametrize("create_kind,extra,param", [
    ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"echo": True}, "echo")])
def test_bad_values_are_400s_naming_the_param(served, client, create_kind, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        if create_kind == "completions":
            client.completions.create(model=served.model_dir.name, prompt="Hi",
                                      max_tokens=extra.get("max_tokens", 2),
                                      extra_body={k: v for k, v in extra.items()
                                                  if k != "max_tokens"})
        else:
            client.chat.completions.create(model=served.model_dir.name, max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}],
                                           extra_body=extra)
    assert info.value.param == param


def test_grpc_prompt_logprobs_out_of_range_is_invalid_argument(served, stub):
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=2, prompt_logprobs=21))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_logprobs must be in [0, 20]" in info.value.details()
