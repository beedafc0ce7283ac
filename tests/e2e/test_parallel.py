"""n, best_of and batches of prompts through one `tandem serve`, with the official openai client
and the public gRPC API: seeded branches (seed + i) reproducible and branch 0 the n = 1
answer, greedy branches transformers' tokens, streamed choices each ending on their own,
best_of's pick by cumulative logprob, batches answering each prompt as alone, the 400s, and
every KV block back after an n = 4 request is aborted, disconnected or past its deadline."""

from __future__ import annotations

import grpc
import openai
import pytest

from protos.tandem.v1 import common_pb2, generation_pb2
from tests.reference import hf_greedy, prompt_ids

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello"]
# a fixed length: EOS ignored, so every branch's usage is known
FIXED = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def served(tiny_models, serve_model):
    return serve_model(tiny_models["llama"])


def complete(client, prompt, **kw):
    return client.completions.create(model="", prompt=prompt, max_tokens=12, **kw)


def texts(response) -> list[str]:
    assert [c.index for c in response.choices] == list(range(len(response.choices)))
    return [c.text for c in response.choices]


def test_n_seeded_branches_differ_are_reproducible_and_branch_0_is_n_1(client):
    first = complete(client, PROMPTS[0], n=4, seed=42, temperature=2.0, **FIXED)
    assert len(set(texts(first))) == 4
    assert texts(complete(client, PROMPTS[0], n=4, seed=42, temperature=2.0, **FIXED)) == \
        texts(first)
    single = complete(client, PROMPTS[0], seed=42, temperature=2.0, **FIXED)
    assert texts(single) == texts(first)[:1]
    # the prompt counted once, every branch's tokens
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    assert first.usage.completion_tokens == 4 * 12
    assert {c.finish_reason for c in first.choices} == {"length"}


def test_greedy_branches_are_the_greedy_answer_and_transformers_tokens(served, client, stub):
    single = complete(client, PROMPTS[1], temperature=0)
    assert texts(complete(client, PROMPTS[1], n=3, temperature=0)) == texts(single) * 3
    prompt = prompt_ids(4, 21, 2000)
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt), n=3,
        sampling=common_pb2.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    responses = list(stub.Generate(request, timeout=60))
    branches = [[t for r in responses if r.index == i for t in r.token_ids] for i in range(3)]
    assert branches == [hf_greedy(served.model_dir, prompt, 10)] * 3
    finals = [r for r in responses if r.finish_reason]
    assert sorted(r.index for r in finals) == [0, 1, 2]
    assert [r.usage.completion_tokens for r in finals] == [10] * 3
    assert finals[-1] is responses[-1] and responses[-1].timings.decode_s > 0


def test_streamed_choices_end_on_their_own_with_the_non_streamed_texts(client):
    whole = complete(client, PROMPTS[2], n=2, seed=5, temperature=1.5, **FIXED)
    chunks = list(complete(client, PROMPTS[2], n=2, seed=5, temperature=1.5, stream=True,
                           stream_options={"include_usage": True}, **FIXED))
    streamed, finishes = ["", ""], []
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.text
        if choice.finish_reason:
            finishes.append((choice.index, choice.finish_reason))
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert streamed == texts(whole)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * 12


def test_best_of_returns_the_branch_with_the_best_cumulative_logprob(client):
    # best_of's branches are the n = 3 request's (branch i samples with seed + i)
    all3 = complete(client, PROMPTS[0], n=3, seed=9, temperature=2.0, logprobs=0, **FIXED)
    scores = [sum(c.logprobs.token_logprobs) for c in all3.choices]
    best = max(range(3), key=lambda i: (scores[i], -i))
    picked = complete(client, PROMPTS[0], best_of=3, seed=9, temperature=2.0, **FIXED)
    assert texts(picked) == [all3.choices[best].text]
    assert picked.choices[0].logprobs is None  # ranked by them, not asked for
    assert picked.usage.completion_tokens == 3 * 12  # every branch was generated
    two = complete(client, PROMPTS[0], n=2, best_of=3, seed=9, temperature=2.0, logprobs=1,
                   **FIXED)
    ranked = sorted(range(3), key=lambda i: (-scores[i], i))[:2]
    assert texts(two) == [all3.choices[i].text for i in ranked]
    assert [c.logprobs.tokens for c in two.choices] == [all3.choices[i].logprobs.tokens
                                                        for i in ranked]


@pytest.mark.parametrize("as_ids", [False, True])
def test_a_batch_of_prompts_answers_each_as_alone(served, client, as_ids):
    prompts = PROMPTS if not as_ids else [prompt_ids(i, 5 + i, 2000) for i in range(3)]
    batch = complete(client, prompts, n=2, seed=3, temperature=1.5, **FIXED)
    alone = [texts(complete(client, p, n=2, seed=3, temperature=1.5, **FIXED)) for p in prompts]
    assert texts(batch) == [t for pair in alone for t in pair]
    assert batch.usage.completion_tokens == 6 * 12
    stream = complete(client, prompts, n=2, seed=3, temperature=1.5, stream=True, **FIXED)
    streamed = [""] * 6
    for chunk in stream:
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == texts(batch)


def test_chat_n(client):
    messages = [{"role": "user", "content": "Hi"}]
    two = client.chat.completions.create(model="", messages=messages, n=2, seed=1,
                                         temperature=1.5, max_tokens=10)
    one = client.chat.completions.create(model="", messages=messages, seed=1, temperature=1.5,
                                         max_tokens=10)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == one.choices[0].message.content
    stream = client.chat.completions.create(model="", messages=messages, n=2, seed=1,
                                            temperature=1.5, max_tokens=10, stream=True)
    contents, roles = ["", ""], []
    for chunk in stream:
        choice = chunk.choices[0]
        contents[choice.index] += choice.delta.content or ""
        if choice.delta.role:
            roles.append(choice.index)
    assert sorted(roles) == [0, 1]
    assert contents == [c.message.content for c in two.choices]


@pytest.mark.parametrize("fields, param", [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"), ({"prompt": ["a", ""]}, "prompt.1")])
def test_bad_choices_are_400_naming_the_param(client, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": "", "prompt": "a", "max_tokens": 2, **fields})
    assert info.value.body["param"] == param


def _open(stub, request_id: str, timeout: float = 60):
    request = generation_pb2.GenerateRequest(
        request_id=request_id, token_ids=generation_pb2.TokenIds(ids=prompt_ids(8, 40, 2000)),
        n=4, sampling=common_pb2.SamplingParams(max_tokens=900, ignore_eos=True, seed=2))
    return stub.Generate(request, timeout=timeout)


def test_abort_by_request_id_ends_every_branch(served, stub):
    call = _open(stub, "n4-abort")
    next(call)
    assert stub.Abort(generation_pb2.AbortRequest(request_id="n4-abort"), timeout=10).aborted
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_deadline_ends_every_branch(stub):
    call = _open(stub, "n4-deadline", timeout=1.0)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_disconnect_ends_every_branch(client):
    stream = client.completions.create(model="", prompt=PROMPTS[0], n=4, max_tokens=900,
                                       stream=True, **FIXED)
    first = next(iter(stream))
    stream.close()  # the client fixture then checks that every block came back
    assert first.choices[0].index in range(4)


def test_grpc_best_of_sends_the_pick_at_the_end(stub):
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt_ids(6, 9, 2000)), n=1, best_of=3,
        sampling=common_pb2.SamplingParams(max_tokens=8, seed=2, temperature=2.0,
                                           ignore_eos=True))
    (picked,) = list(stub.Generate(request, timeout=60))
    request.best_of, request.n = 0, 3
    request.sampling.logprobs = 0
    branches = list(stub.Generate(request, timeout=60))
    scores = [sum(e.logprob for r in branches if r.index == i for e in r.logprobs)
              for i in range(3)]
    best = max(range(3), key=lambda i: (scores[i], -i))
    assert list(picked.token_ids) == [t for r in branches if r.index == best for t in r.token_ids]
    assert picked.index == 0 and not picked.logprobs
    assert picked.usage.completion_tokens == 3 * 8 and picked.timings.decode_s > 0


def test_one_prompt_of_a_batch_failing_ends_the_response_and_frees_every_block(client, stub):
    """The second prompt's backend request is aborted by its id (the response's id + "-1"):
    the stream ends with an error event and the other prompts' requests are aborted too."""
    stream = client.completions.create(model="", prompt=PROMPTS, n=2, max_tokens=900,
                                       stream=True, **FIXED)
    chunks = iter(stream)
    first = next(chunks)
    assert stub.Abort(generation_pb2.AbortRequest(request_id=f"{first.id}-1"), timeout=10).aborted
    with pytest.raises(openai.APIError) as info:
        for _ in chunks:
            pass
    assert "abort" in str(info.value).lower() or "cancel" in str(info.value).lower()
