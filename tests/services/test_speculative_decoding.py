"""Speculative decoding in the decode tier, with each proposer (n-gram prompt lookup; a draft
model: the target itself, so drafts land, or another random model, so most are rolled back),
against real tiers: with k from 1 to 6 and 16 concurrent sequences of mixed lengths, greedy
output is token-identical to transformers and seeded sampling to decoding without speculation;
drafts are really accepted (counted per request and in the metrics); every pool (the draft's
too) is back to its starting state, also after requests aborted while drafts were being
verified."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from decode_service.draft import DraftModelProposer
from decode_service.speculative import PROBE_EVERY, SpeculativeConfig
from protos.tandem.v1 import common_pb2, decode_pb2
from tests.reference import hf_greedy, prompt_ids
from tests.services.test_failures import HANG_GUARD_S, Call

VOCAB = 2000


def repetitive_prompt(i: int) -> list[int]:
    """Prompts with repeated spans, so that prompt lookup finds continuations; mixed lengths."""
    unit = prompt_ids(900 + i, 3 + i % 5, VOCAB)
    return (unit * (2 + i % 4))[:40] + prompt_ids(950 + i, i % 7, VOCAB)


def generate(tiers, prompts, max_tokens: int, **sampling) -> list[list]:
    calls = [Call(tiers, decode_pb2.DecodeRequest(
        request_id=f"s{i}", prompt_token_ids=p, prefill_addresses=[tiers.prefill_address],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling)))
        for i, p in enumerate(prompts)]
    for call in calls:
        call.start()
    for call in calls:
        call.result()
        assert call.error is None, call.error
    return [call.responses for call in calls]


def tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def speculative(tiny_models, proposer: str, k: int) -> SpeculativeConfig:
    """ngram; draft-self: the target as its own draft; draft-other: another random model. The
    governor is off: these tests are about drafting's mechanics, whatever it costs here."""
    if proposer == "ngram":
        return SpeculativeConfig("ngram", k, governor=False)
    draft = tiny_models["llama" if proposer == "draft-self" else "qwen2"]
    return SpeculativeConfig("draft", k, draft_model=draft, governor=False)


def assert_draft_pool_free(tiers) -> None:
    proposer = tiers.decode.engine.proposer
    if isinstance(proposer, DraftModelProposer):
        assert proposer.num_free_blocks == proposer.pool.num_blocks
        assert not proposer.mirrors


@pytest.mark.parametrize("proposer,k", [("ngram", 1), ("ngram", 3), ("ngram", 6),
                                        ("draft-self", 2), ("draft-self", 6),
                                        ("draft-other", 1), ("draft-other", 4)])
def test_greedy_output_equals_transformers_with_drafts(tiny_models, start_tiers, proposer, k):
    model = tiny_models["llama"]
    tiers = start_tiers(model, speculative=speculative(tiny_models, proposer, k))
    prompts = [repetitive_prompt(i) for i in range(16)]
    results = generate(tiers, prompts, 24, temperature=0.0)
    for prompt, responses in zip(prompts, results):
        assert tokens(responses) == hf_greedy(model, prompt, 24)
    finals = [r[-1].timings for r in results]
    drafted = sum(t.num_draft_tokens for t in finals)
    accepted = sum(t.num_accepted_draft_tokens for t in finals)
    assert drafted > 0 and 0 < accepted <= drafted, (drafted, accepted)
    if proposer == "draft-self":  # its own greedy continuation: (nearly) every draft lands
        assert accepted >= 0.9 * drafted, (drafted, accepted)
    registry = tiers.decode.engine.metrics.registry
    assert registry.get_sample_value("tandem:spec_decode_num_draft_tokens_total",
                                     {"tier": "decode"}) == drafted
    assert registry.get_sample_value("tandem:spec_decode_num_accepted_tokens_total",
                                     {"tier": "decode"}) == accepted
    assert registry.get_sample_value("tandem:spec_decode_num_accepted_tokens_per_pos_total",
                                     {"tier": "decode", "position": "0"}) > 0
    tiers.wait_idle()
    assert_draft_pool_free(tiers)


@pytest.mark.parametrize("proposer", ["ngram", "draft-self"])
def test_seeded_sampling_is_unchanged_by_speculation(tiny_models, start_tiers, proposer):
    model = tiny_models["llama"]
    plain = start_tiers(model)
    speculating = start_tiers(model, speculative=speculative(tiny_models, proposer, 4))
    prompts = [repetitive_prompt(i) for i in range(8)]
    sampling = {"temperature": 0.7, "seed": 5, "top_k": 50, "ignore_eos": True}
    without = generate(plain, prompts, 20, **sampling)
    with_drafts = generate(speculating, prompts, 20, **sampling)
    assert [tokens(r) for r in with_drafts] == [tokens(r) for r in without]
    assert sum(r[-1].timings.num_draft_tokens for r in with_drafts) > 0
    speculating.wait_idle()
    assert_draft_pool_free(speculating)


@pytest.mark.parametrize("proposer", ["ngram", "draft-self"])
def test_requests_aborted_mid_verification_free_everything(tiny_models, start_tiers, proposer):
    tiers = start_tiers(tiny_models["llama"], speculative=speculative(tiny_models, proposer, 5))
    runner = tiers.decode.engine.parts.runner
    real_execute, verifying, cancelled = runner.execute, threading.Event(), threading.Event()

    def execute(chunks):  # hold the first step that verifies drafts until the clients left
        if any(r.spec_token_ids for r, _ in chunks) and not verifying.is_set():
            verifying.set()
            cancelled.wait(HANG_GUARD_S)
        return real_execute(chunks)

    runner.execute = execute
    stub = tiers.stub()
    calls = [stub.Generate(decode_pb2.DecodeRequest(
        request_id=f"a{i}", prompt_token_ids=repetitive_prompt(i),
        prefill_addresses=[tiers.prefill_address],
        sampling=common_pb2.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)),
        timeout=HANG_GUARD_S) for i in range(4)]
    assert verifying.wait(HANG_GUARD_S), "no drafts were proposed"
    for call in calls:
        call.cancel()
    cancelled.set()
    for call in calls:
        with pytest.raises(grpc.RpcError):
            list(call)
    tiers.wait_idle()  # start_tiers checks every pool again at the end
    assert_draft_pool_free(tiers)


def test_speculation_that_does_not_pay_is_turned_off(tiny_models, start_tiers):
    """A proposer slower than the step it saves (here n-gram lookup that takes a second on the
    engine's clock): the governor measures both modes and keeps drafting to its probes; output
    stays exact."""
    model = tiny_models["llama"]
    tiers = start_tiers(model, speculative=SpeculativeConfig("ngram", 4))
    engine = tiers.decode.engine
    ngram, calls = engine.proposer, []
    engine.clock = lambda: time.monotonic() + len(calls)  # each proposal: one more second

    class SlowProposer:
        def propose(self, requests, ks):
            calls.append(len(requests))
            return ngram.propose(requests, ks)

        def forget(self, request_id):
            ngram.forget(request_id)

        def keep_only(self, running):
            ngram.keep_only(running)

    engine.proposer = SlowProposer()
    prompts = [repetitive_prompt(i) for i in range(4)]
    results = generate(tiers, prompts, 64, temperature=0.0, ignore_eos=True)
    plain = generate(start_tiers(model), prompts, 64, temperature=0.0, ignore_eos=True)
    assert [tokens(r) for r in results] == [tokens(r) for r in plain]
    decisions = sum(engine.governor._steps.values())
    assert decisions > 2 * PROBE_EVERY
    assert len(calls) < decisions / 2, (len(calls), decisions)  # drafting only as probes, mostly
    rates = engine.governor.rates(4)
    assert rates[True] < rates[False], rates
    registry = engine.metrics.registry
    steps = {mode: registry.get_sample_value("tandem:spec_decode_steps_total",
                                             {"tier": "decode", "mode": mode})
             for mode in ("draft", "plain")}
    assert steps["plain"] > 2 * steps["draft"] > 0, steps
    tiers.wait_idle()
