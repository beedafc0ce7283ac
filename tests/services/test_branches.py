"""n > 1 against real tiers: one prefill leg and one KV transfer for all branches, the prompt's
full blocks shared by reference on the decode tier, seeded branches reproducible (branch i uses
seed + i), preemption of branches exact, and every block back on every exit."""

from __future__ import annotations

import threading

import grpc
import pytest

from protos.tandem.v1 import common_pb2, decode_pb2
from tests.reference import hf_greedy, prompt_ids
from tests.services.test_failures import HANG_GUARD_S
from tests.services.test_speculative_decoding import (assert_draft_pool_free, repetitive_prompt,
                                                      speculative)


def _request(tiers, prompt: list[int], n: int, max_tokens: int = 8,
             **sampling) -> decode_pb2.DecodeRequest:
    return decode_pb2.DecodeRequest(
        request_id="b", prompt_token_ids=prompt, prefill_addresses=[tiers.prefill_address], n=n,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))


def _branches(responses, n: int) -> list[list[int]]:
    """Each branch's tokens; checks each ends exactly once, with usage, the last with timings."""
    tokens: list[list[int]] = [[] for _ in range(n)]
    ends = []
    for resp in responses:
        assert resp.index not in ends, "a message after its branch's finish"
        tokens[resp.index] += resp.token_ids
        if resp.finish_reason:
            ends.append(resp.index)
            assert resp.usage.completion_tokens == len(tokens[resp.index])
    assert sorted(ends) == list(range(n))
    assert responses[-1].timings.decode_s > 0
    assert all(not r.HasField("timings") for r in responses[:-1])
    return tokens


def _metric(server, name: str, tier: str) -> float:
    return server.engine.metrics.registry.get_sample_value(name, {"tier": tier}) or 0.0


def test_n_branches_share_one_prefill_one_transfer_and_the_prompt_blocks(tiny_models,
                                                                         start_tiers):
    tiers = start_tiers(tiny_models["llama"])
    stub = tiers.stub()
    prompt = prompt_ids(3, 40, 2000)  # 2 full blocks of 16 + 8 tokens; + 8 new: 3 blocks each
    single = _branches(list(stub.Generate(_request(tiers, prompt, 1, seed=11))), 1)
    one_transfer = _metric(tiers.decode, "tandem:kv_transfer_bytes_total", "decode")
    tiers.wait_idle()

    pool = tiers.decode.engine.parts.scheduler.pool
    held, shared_refs = [], []
    scheduler = tiers.decode.engine.parts.scheduler
    real_schedule = scheduler.schedule

    def schedule():
        output = real_schedule()
        held.append(pool.num_blocks - pool.num_free_blocks)
        running = [r for r in scheduler.running if r.block_ids]
        shared_refs.append(max((pool.ref_count(r.block_ids[0]) for r in running), default=0))
        return output

    scheduler.schedule = schedule
    prefills_before = _metric(tiers.prefill, "tandem:prompt_tokens_total", "prefill")
    first = _branches(list(stub.Generate(_request(tiers, prompt, 4, seed=11))), 4)
    scheduler.schedule = real_schedule

    # one prefill leg (the prompt counted once there), one transfer of the prompt's KV
    assert _metric(tiers.prefill, "tandem:prompt_tokens_total", "prefill") - prefills_before == 40
    assert _metric(tiers.decode, "tandem:kv_transfer_bytes_total", "decode") == 2 * one_transfer
    # 4 separate requests would hold 12 blocks; sharing the 2 full ones: 3 + 3 x 1
    assert max(held) == 6
    assert max(shared_refs) == 4
    # branch 0 is the n = 1 answer; the others differ; the same request gives the same four
    assert first[0] == single[0]
    assert len({tuple(t) for t in first}) == 4
    tiers.wait_idle()
    assert _branches(list(stub.Generate(_request(tiers, prompt, 4, seed=11))), 4) == first


@pytest.mark.parametrize("length", [32, 33])  # the last prompt block full / one token
def test_greedy_branches_equal_transformers(tiny_models, start_tiers, length):
    model = tiny_models["llama"]
    tiers = start_tiers(model)
    prompt = prompt_ids(5, length, 2000)
    branches = _branches(list(tiers.stub().Generate(
        _request(tiers, prompt, 3, max_tokens=10, temperature=0.0))), 3)
    assert branches == [hf_greedy(model, prompt, 10)] * 3


def test_preempted_branches_give_the_tokens_they_give_unpressured(tiny_models, start_tiers):
    """n = 4 branches of 20 + 50 tokens (5 blocks each) on a decode pool of 8 blocks: the
    newest branches are preempted and recomputed, and produce what a roomy pool gives."""
    roomy = start_tiers(tiny_models["llama"])
    tight = start_tiers(tiny_models["llama"], decode={"num_kv_blocks": 8, "max_model_len": 128})
    prompt = prompt_ids(7, 20, 2000)
    results = []
    for tiers in (roomy, tight):
        responses = list(tiers.stub().Generate(
            _request(tiers, prompt, 4, max_tokens=50, temperature=1.0, seed=3),
            timeout=HANG_GUARD_S))
        results.append(_branches(responses, 4))
    assert tight.decode.engine.parts.scheduler.num_preemptions > 0, "no pressure: proves nothing"
    assert roomy.decode.engine.parts.scheduler.num_preemptions == 0
    assert results[0] == results[1]


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_an_n_request_cut_short_frees_every_block(tiny_models, start_tiers, how):
    """Cancelled after its first message, or past its deadline, while the branches decode:
    both pools end empty (the fixture asserts it)."""
    tiers = start_tiers(tiny_models["llama"])
    request = _request(tiers, prompt_ids(9, 40, 2000), 4, max_tokens=200, seed=1)
    if how == "cancel":
        call = tiers.stub().Generate(request, timeout=HANG_GUARD_S)
        next(call)
        call.cancel()
        return
    # the deadline lands while the branches decode: hold each step until it has passed
    runner = tiers.decode.engine.parts.runner
    real_execute, late = runner.execute, threading.Event()

    def execute(chunks):
        if any(c.request.num_output_tokens for c in chunks):
            late.wait(2.0)
        return real_execute(chunks)

    runner.execute = execute
    with pytest.raises(grpc.RpcError) as err:
        list(tiers.stub().Generate(request, timeout=1.0))
    late.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_n_above_max_num_seqs_is_invalid(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], decode={"max_num_seqs": 4})
    with pytest.raises(grpc.RpcError) as err:
        list(tiers.stub().Generate(_request(tiers, prompt_ids(1, 8, 2000), 5)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_num_seqs" in err.value.details()


@pytest.mark.parametrize("proposer", ["ngram", "draft-self"])
def test_branches_draft_like_any_request(tiny_models, start_tiers, proposer):
    """With n-gram speculation or a draft model (each branch its own mirror), greedy branches
    are transformers' tokens and seeded ones what they are without drafts; drafts are scored,
    and summed in the request's timings; the draft's pool is free afterwards."""
    model = tiny_models["llama"]
    plain = start_tiers(model)
    speculating = start_tiers(model, speculative=speculative(tiny_models, proposer, 3))
    prompt = repetitive_prompt(10)  # one whose branches do draft
    greedy = list(speculating.stub().Generate(
        _request(speculating, prompt, 3, max_tokens=24, temperature=0.0), timeout=HANG_GUARD_S))
    assert _branches(greedy, 3) == [hf_greedy(model, prompt, 24)] * 3
    assert greedy[-1].timings.num_draft_tokens > 0
    seeded = [_branches(list(tiers.stub().Generate(
        _request(tiers, prompt, 3, max_tokens=24, seed=4), timeout=HANG_GUARD_S)), 3)
        for tiers in (plain, speculating)]
    assert seeded[0] == seeded[1]
    speculating.wait_idle()
    assert_draft_pool_free(speculating)


@pytest.mark.parametrize("length, max_tokens", [(1, 4), (20, 1)])
def test_edges_one_token_prompt_and_one_token_answers(tiny_models, start_tiers, length,
                                                      max_tokens):
    """A one-token prompt shares no block; a parent finished by its first token (max_tokens 1)
    frees its references while its forks still read the shared blocks."""
    model = tiny_models["llama"]
    tiers = start_tiers(model)
    prompt = prompt_ids(12, length, 2000)
    branches = _branches(list(tiers.stub().Generate(
        _request(tiers, prompt, 3, max_tokens=max_tokens, temperature=0.0))), 3)
    assert branches == [hf_greedy(model, prompt, max_tokens)] * 3
