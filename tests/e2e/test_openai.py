"""Through `tandem serve` with the official openai client, for all four architectures: text and
usage equal transformers generate(); streaming equals non-streaming; chat uses the template;
every KV block is free after each test."""

from __future__ import annotations

import concurrent.futures
import random

import openai
import pytest
from transformers import AutoTokenizer

from tests.reference import hf_greedy

ARCHES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=ARCHES)
def served(request, tiny_models, serve_model):
    # a small chunk size so long prompts really are computed in several chunks
    return serve_model(tiny_models[request.param], "--max-prefill-tokens", "64")


@pytest.fixture
def client(served):
    yield openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)
    served.assert_all_blocks_free()


def expected(served, prompt_ids, max_tokens):
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    ids = hf_greedy(served.model_dir, prompt_ids, max_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def test_concurrent_completions_match_transformers(served, client):
    rng = random.Random(0)
    lengths = [1, 3, 17, 40, 64, 65, 150, 300]
    prompts = [[rng.randrange(5, 2000) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randrange(4, 24) for _ in prompts]
    model = served.model_dir.name

    def complete(i):
        return client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens[i],
                                         temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(complete, range(len(prompts))))
    for prompt, n, result in zip(prompts, max_tokens, results):
        text, num_tokens = expected(served, prompt, n)
        assert result.choices[0].text == text
        assert result.usage.prompt_tokens == len(prompt)
        assert result.usage.completion_tokens == num_tokens
        assert result.choices[0].finish_reason == ("length" if num_tokens == n else "stop")


def test_text_prompt_streaming_equals_non_streaming(served, client):
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    prompt = "The model server streams tokens from the decode tier 🚀 数据 über"
    model = served.model_dir.name
    full = client.completions.create(model=model, prompt=prompt, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=30,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    text, num_tokens = expected(served, tokenizer(prompt).input_ids, 30)
    assert full.choices[0].text == streamed == text
    assert "\ufffd" not in streamed or "\ufffd" in text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == num_tokens


def test_chat_goes_through_the_template(served, client):
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say something about caches."}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    result = client.chat.completions.create(model=served.model_dir.name, messages=messages,
                                            max_tokens=16, temperature=0)
    text, num_tokens = expected(served, list(prompt_ids), 16)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == text
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == num_tokens
    stream = client.chat.completions.create(model=served.model_dir.name, messages=messages,
                                            max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_stop_strings_are_excluded(served, client):
    model = served.model_dir.name
    full = client.completions.create(model=model, prompt=[7, 8, 9], max_tokens=20, temperature=0)
    text = full.choices[0].text
    assert len(text) >= 6, text  # the tiny models give 20 tokens here (a skip could never fail)
    stop = text[3:5]
    cut = client.completions.create(model=model, prompt=[7, 8, 9], max_tokens=20, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
