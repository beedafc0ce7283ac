"""`tandem serve --speculative-method ngram --num-speculative-tokens 3`: the flags reach the decode
tier through the launcher; with the official openai client, greedy output equals transformers'
and the response's tandem_timings count the drafts scored and accepted. The governor is off
(--no-speculative-governor): on this CPU drafting may not pay, and these tests are about its
mechanics (tests/services/test_speculative_decoding.py tests the governor)."""

from __future__ import annotations

import re

import openai
import pytest
from transformers import AutoTokenizer

from tests.reference import hf_greedy, prompt_ids


@pytest.fixture(scope="module")
def served(tiny_models, serve_model):
    return serve_model(tiny_models["llama"], "--speculative-method", "ngram",
                       "--num-speculative-tokens", "3", "--no-speculative-governor")


def test_greedy_output_is_exact_and_the_drafts_are_counted(tiny_models, served):
    model = tiny_models["llama"]
    client = openai.OpenAI(base_url=served.base_url, api_key="x", max_retries=0, timeout=120)
    tokenizer = AutoTokenizer.from_pretrained(model)
    drafted = 0
    for i in range(4):
        prompt = (prompt_ids(40 + i, 6, 2000) * 4)[:22]  # repeats: prompt lookup finds them
        result = client.completions.create(model=model.name, prompt=prompt, max_tokens=32,
                                           temperature=0)
        expected = hf_greedy(model, prompt, 32)
        assert result.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert result.usage.completion_tokens == len(expected)
        timings = result.model_extra["tandem_timings"]
        assert 0 <= timings["num_accepted_draft_tokens"] <= timings["num_draft_tokens"]
        drafted += timings["num_draft_tokens"]
    assert drafted > 0
    served.assert_all_blocks_free()


def test_a_request_under_a_grammar_gets_no_drafts(tiny_models, served):
    """Constrained requests decode one token a step (decode_service/engine.py `_propose`): the
    repeating prompt gets drafts without a grammar and none with one, and the output follows
    the grammar."""
    model = tiny_models["llama"]
    client = openai.OpenAI(base_url=served.base_url, api_key="x", max_retries=0, timeout=120)
    prompt = (prompt_ids(40, 6, 2000) * 4)[:22]
    regex = "[a-z ]{40,60}"
    free = client.completions.create(model=model.name, prompt=prompt, max_tokens=32,
                                     temperature=0)
    constrained = client.completions.create(model=model.name, prompt=prompt, max_tokens=80,
                                            temperature=0, extra_body={"guided_regex": regex})
    assert free.model_extra["tandem_timings"]["num_draft_tokens"] > 0
    assert constrained.model_extra["tandem_timings"]["num_draft_tokens"] == 0
    assert constrained.choices[0].finish_reason == "stop"
    assert re.fullmatch(regex, constrained.choices[0].text)
    served.assert_all_blocks_free()


PYTHON_PROMPTS = ("def fibonacci(n):", "import os\n\n\ndef main():\n",
                  "class Stack:\n    def __init__(self):\n", "def is_prime(n):\n    ")


def test_the_builtin_pair_speculates_with_its_draft_and_output_is_unchanged(serve_model):
    """`tandem serve --speculative-method draft`: the built-in draft (no --draft-model needed)
    proposes for the built-in target; greedy output is transformers' on the target, and the
    drafts trained for it are accepted at a real rate."""
    from engine.model.checkpoint import BUILTIN_MODEL_NAME, builtin_model_dir

    served = serve_model(None, "--speculative-method", "draft", "--num-speculative-tokens", "4",
                         "--no-speculative-governor")
    client = openai.OpenAI(base_url=served.base_url, api_key="x", max_retries=0, timeout=120)
    model = builtin_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model)
    drafted = accepted = 0
    for prompt in PYTHON_PROMPTS:
        result = client.completions.create(model=BUILTIN_MODEL_NAME, prompt=prompt,
                                           max_tokens=48, temperature=0)
        expected = hf_greedy(model, tokenizer(prompt).input_ids, 48)
        assert result.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        timings = result.model_extra["tandem_timings"]
        drafted += timings["num_draft_tokens"]
        accepted += timings["num_accepted_draft_tokens"]
    assert drafted > 0 and accepted >= 0.3 * drafted, (drafted, accepted)
    served.assert_all_blocks_free()
