"""Grammar-constrained decoding on the tiers (engine/structured.py) with real xgrammar matchers
over the tiny byte-level BPE tokenizer: the grammar cache, the mask applied only to constrained
rows, the matcher across the prefill -> decode hand-off, and preemption (recompute) that never
advances a matcher twice."""

from __future__ import annotations

import json
import re

import pytest
import torch
import xgrammar as xgr

from engine.block_pool import BlockPool
from engine.request import Request, RequestStatus
from engine.sampler import sample, sample_with_logprobs
from engine.sampling_params import SamplingParams, StructuredOutput
from engine.scheduler import Scheduler, SchedulerConfig
from engine.structured import GrammarCache, InvalidStructuredOutput, _printable_strings
from engine.tokenizer import Tokenizer

EOS = 2  # </s> of the tiny tokenizer
PAD = 3  # model vocab = tokenizer vocab + PAD ids no token spells
REGEX = StructuredOutput("regex", "[a-z]{2,6}-[0-9]{2}")
CHOICE = StructuredOutput("choice", json.dumps(["yes", "no"]))


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def vocab(tokenizer) -> int:
    return tokenizer.vocab_size + PAD


@pytest.fixture
def cache(tokenizer, vocab) -> GrammarCache:
    return GrammarCache(tokenizer, vocab, [EOS], capacity=2)


def allowed(matcher, vocab: int) -> set[int]:
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bitmask, 0)
    logits = torch.zeros(1, vocab)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_the_cache_compiles_each_spec_once_and_drops_the_least_recently_used(cache):
    cache.matcher(REGEX)
    cache.matcher(REGEX)
    assert cache.num_compiled == 1
    cache.matcher(CHOICE)
    cache.matcher(REGEX)  # REGEX is the most recent now
    cache.matcher(StructuredOutput("json_object"))  # capacity 2: CHOICE goes
    assert (len(cache), cache.num_compiled) == (2, 3)
    cache.matcher(REGEX)
    assert cache.num_compiled == 3
    cache.matcher(CHOICE)
    assert cache.num_compiled == 4


@pytest.mark.parametrize("spec, problem", [
    (StructuredOutput("regex", "(ab"), "the regex does not compile: Regex parsing error"),
    (StructuredOutput("json_schema", '{"type": "nope"}'), "the json_schema does not compile"),
    (StructuredOutput("grammar", "root ::= missing"), "the grammar does not compile"),
])
def test_a_spec_that_does_not_compile_is_an_invalid_request(cache, spec, problem):
    with pytest.raises(InvalidStructuredOutput, match=f"^structured output: {problem}"):
        cache.matcher(spec)
    assert len(cache) == 0


def test_special_and_padding_ids_are_never_allowed_and_eos_only_at_the_end(cache, tokenizer,
                                                                           vocab):
    matcher = cache.matcher(CHOICE)
    first = allowed(matcher, vocab)
    assert first and not first & (set(tokenizer.all_special_ids) | set(range(vocab - PAD, vocab)))
    assert {tokenizer.decode([t])[0] for t in first} == {"y", "n"}
    for token in tokenizer.encode("no"):
        assert matcher.accept_token(token)
    assert allowed(matcher, vocab) == {EOS}


def test_bounded_strings_get_a_pattern_without_control_characters():
    schema = {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 1, "maxLength": 3},
        "e": {"type": "string", "maxLength": 3, "enum": ["a"]},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 2}}}}
    out = _printable_strings(schema)
    pattern = out["properties"]["s"]["pattern"]
    assert "maxLength" not in out["properties"]["s"] and out["properties"]["e"] == {
        "type": "string", "maxLength": 3, "enum": ["a"]}
    assert out["properties"]["items"]["items"]["pattern"].endswith("{0,2}$")
    assert re.fullmatch(pattern, "ab\u00e9") and not re.fullmatch(pattern, "a\x04")
    assert not re.fullmatch(pattern, "") and not re.fullmatch(pattern, "abcd")


def test_the_mask_applies_only_to_constrained_rows_and_logprobs_stay_raw(cache, vocab):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    free = Request("free", [5], SamplingParams(max_tokens=4, temperature=0.0, logprobs=0))
    constrained = Request("choice", [5], SamplingParams(max_tokens=4, temperature=0.0,
                                                        logprobs=0), grammar=cache.matcher(CHOICE))
    seeded = Request("seeded", [5], SamplingParams(max_tokens=4, seed=7))
    result = sample_with_logprobs(logits, [free, constrained, seeded], frozenset({EOS}))
    assert torch.equal(logits, before)
    options = sorted(allowed(cache.matcher(CHOICE), vocab))
    assert result.tokens[0] == int(logits[0].argmax())
    assert result.tokens[1] == options[int(logits[1, options].argmax())]
    assert result.tokens[2] == sample(logits[2:], [seeded])[0]  # as alone, unconstrained
    raw = torch.log_softmax(logits[1], dim=-1)[result.tokens[1]].item()
    assert result.logprobs[1].logprob == pytest.approx(raw, abs=1e-5)


def step(scheduler: Scheduler, vocab: int, generator: torch.Generator) -> list[Request]:
    """One step: every request whose chunk ends its tokens samples (greedy) from random logits,
    through the real sampler and its grammar mask."""
    output = scheduler.schedule()
    rows = [r for r, n in output.chunks if r.num_computed_tokens + n == r.num_tokens]
    tokens = sample(torch.randn(len(rows), vocab, generator=generator), rows, frozenset({EOS}))
    return scheduler.update_from_output(output, dict(zip((r.request_id for r in rows), tokens)))


def scheduler(num_blocks: int, max_model_len: int, remote: bool = False) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8, block_size=4,
                             max_model_len=max_model_len, kv_from_remote=remote)
    return Scheduler(config, BlockPool(num_blocks), frozenset({EOS}))


def greedy(spec: StructuredOutput, max_tokens: int = 32) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_output=spec)


def test_the_decode_matcher_accepts_the_first_token_from_prefill(cache, tokenizer, vocab):
    generator = torch.Generator().manual_seed(1)
    prompt = tokenizer.encode("Hello")
    prefill = scheduler(16, 64)
    first = Request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0,
                                                structured_output=REGEX),
                    grammar=cache.matcher(REGEX))
    prefill.add(first)
    while not first.status.finished:
        step(prefill, vocab, generator)
    [token] = first.output_token_ids  # masked by the prefill tier's own matcher
    decode = scheduler(16, 64, remote=True)
    request = Request("d", prompt, greedy(REGEX), grammar=cache.matcher(REGEX))
    decode.add(request)
    assert decode.schedule().admitted_for_kv == [request]
    decode.kv_arrived("d", token)  # advances the decode tier's matcher
    while not request.status.finished:
        step(decode, vocab, generator)
    assert request.status is RequestStatus.FINISHED_STOPPED and request.stop_token_id == EOS
    assert request.output_token_ids[0] == token
    assert re.fullmatch(REGEX.spec, tokenizer.decode(request.output_token_ids[:-1]))


def test_a_first_token_the_grammar_refuses_fails_the_request(cache, tokenizer):
    decode = scheduler(16, 64, remote=True)
    request = Request("d", [5], greedy(CHOICE), grammar=cache.matcher(CHOICE))
    decode.add(request)
    decode.schedule()
    decode.kv_arrived("d", tokenizer.encode("x")[0])
    assert request.status is RequestStatus.FINISHED_ERROR and "not allowed" in request.error


def test_preemption_and_recompute_never_advance_the_matcher_twice(cache, tokenizer, vocab):
    """The newer, constrained request is preempted mid-output and recomputed (prompt and output
    again): were its tokens fed to the matcher again, the only string the grammar allows would
    refuse them (an error) or come out wrong."""
    text = ";".join("qxzjvkwy" * 4)  # one token a character: ~60 tokens
    spec = StructuredOutput("choice", json.dumps([text]))
    generator = torch.Generator().manual_seed(2)
    s = scheduler(num_blocks=24, max_model_len=96)
    long = Request("a", list(range(10, 70)), SamplingParams(max_tokens=36, temperature=0.0,
                                                            ignore_eos=True))
    constrained = Request("b", tokenizer.encode("Hello"), greedy(spec, max_tokens=80),
                          grammar=cache.matcher(spec))
    s.add(long)
    s.add(constrained)
    while not constrained.status.finished:
        step(s, vocab, generator)
        for done in (long, constrained):
            if done.status.finished and done.block_ids:
                s.free_blocks(done)
    assert constrained.num_preemptions >= 1
    assert constrained.status is RequestStatus.FINISHED_STOPPED
    assert tokenizer.decode(constrained.output_token_ids[:-1]) == text


def test_min_tokens_does_not_hold_back_the_eos_a_complete_grammar_needs(cache, tokenizer, vocab):
    s = scheduler(16, 64)
    params = SamplingParams(max_tokens=20, min_tokens=10, temperature=0.0,
                            structured_output=CHOICE)
    request = Request("a", [5], params, grammar=cache.matcher(CHOICE))
    s.add(request)
    generator = torch.Generator().manual_seed(3)
    while not request.status.finished:
        step(s, vocab, generator)
    assert request.status is RequestStatus.FINISHED_STOPPED and request.stop_token_id == EOS
    assert tokenizer.decode(request.output_token_ids[:-1]) in ("yes", "no")
