"""Through `tandem serve`, a Llama with a Llama-2-style (SentencePiece/Metaspace) tokenizer, whose
decoder strips the first space of a text: greedy ids equal transformers generate(), and the text
(public gRPC stream, OpenAI non-streamed and SSE-streamed) is what the generated ids add after
the prompt, decode(prompt + generated) past decode(prompt), so the first word keeps its leading
space (issue 9). One server for the module; every KV block is free after each test."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from protos.tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.reference import hf_greedy

# Text prompts get <s> in front; "你好" ends in <0xXX> byte-fallback tokens.
PROMPTS = ["the cat", "Hello world, this is a test.", "你好"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def served(metaspace_model, serve_model):
    return serve_model(metaspace_model)


@pytest.fixture(scope="module")
def hf_tokenizer(metaspace_model):
    return AutoTokenizer.from_pretrained(metaspace_model)


@pytest.fixture
def client(served):
    yield openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)
    served.assert_all_blocks_free()


def added_text(hf_tokenizer, prompt_ids: list[int], gen_ids: list[int]) -> str:
    """transformers' decode(prompt + generated) past decode(prompt)."""
    full = hf_tokenizer.decode(prompt_ids + gen_ids, skip_special_tokens=True)
    prompt = hf_tokenizer.decode(prompt_ids, skip_special_tokens=True)
    assert full.startswith(prompt)
    return full[len(prompt):]


@pytest.fixture(scope="module", params=PROMPTS)
def case(request, served, hf_tokenizer) -> tuple[str, list[int], list[int], str]:
    """(prompt, prompt ids, transformers' greedy ids, the text they add after the prompt)."""
    prompt_ids = hf_tokenizer(request.param).input_ids
    gen_ids = hf_greedy(served.model_dir, prompt_ids, MAX_TOKENS)
    text = added_text(hf_tokenizer, prompt_ids, gen_ids)
    assert text.startswith(" ") and not hf_tokenizer.decode(gen_ids).startswith(" "), \
        "premise: the first generated word has a leading space that decoding it alone strips"
    return request.param, prompt_ids, gen_ids, text


def test_grpc_ids_match_transformers_and_text_keeps_the_space(served, case):
    prompt, prompt_ids, gen_ids, text = case
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(
            generation_pb2.GenerateRequest(text=prompt, sampling=common_pb2.SamplingParams(
                max_tokens=MAX_TOKENS, temperature=0.0)), timeout=60))
    assert [t for r in responses for t in r.token_ids] == gen_ids
    assert "".join(r.text for r in responses) == text
    assert responses[-1].usage.prompt_tokens == len(prompt_ids)
    served.assert_all_blocks_free()


def test_openai_text_streamed_and_not_keeps_the_space(served, client, case):
    prompt, prompt_ids, gen_ids, text = case
    model = served.model_dir.name
    full = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True))
    assert full.choices[0].text == "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert full.usage.prompt_tokens == len(prompt_ids)
    assert full.usage.completion_tokens == len(gen_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_follows_the_grammar_with_a_byte_fallback_vocabulary(served, client,
                                                                                stream):
    """xgrammar reads this vocabulary as SentencePiece's ("▁" a space, <0xXX> a byte), so the
    text the client gets (first space kept) is what the grammar accepted."""
    regex = "[a-z]{2,8}( [a-z]{1,6}){1,3}[.!]"
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}},
              "required": ["word", "n"]}
    for extra, check in (({"guided_regex": regex}, lambda t: re.fullmatch(regex, t)),
                         ({"guided_json": schema},
                          lambda t: jsonschema.validate(json.loads(t), schema) is None)):
        response = client.completions.create(model=served.model_dir.name, prompt="the cat",
                                             max_tokens=60, seed=5, stream=stream,
                                             extra_body=extra)
        chunks = [c for c in response if c.choices] if stream else [response]
        text = "".join(c.choices[0].text for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop" and check(text), text
