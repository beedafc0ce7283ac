"""Admission control on the decode tier: past `max_queue_len` requests waiting for admission, a
new request is refused at once with RESOURCE_EXHAUSTED (HTTP 429 at the gateway, see
tests/unit/test_gateway_convert.py) and no work is done for it; the queued ones still run.

Real servers; the system is brought to the point under test by holding the prefill engine's steps
and observing the decode scheduler (thin wrappers, events; timeouts are hang guards only)."""

from __future__ import annotations

import threading

import grpc
import pytest

from tests.reference import hf_greedy, prompt_ids
from tests.services.test_failures import (HANG_GUARD_S, Call, decode_request, held_back,
                                          hold_prefill_steps)


def test_a_request_past_the_queue_limit_is_refused_at_once(tiny_models, start_tiers):
    # decode's pool of 6 blocks holds one 60-token prompt with 30 new tokens at a time: the
    # first request is admitted (its prefill held), the second waits in the queue (the limit,
    # 1), the third is refused
    model = tiny_models["llama"]
    tiers = start_tiers(model, decode={"num_kv_blocks": 6, "max_model_len": 96}, max_queue_len=1)
    scheduler = tiers.decode.engine.parts.scheduler
    prompt = prompt_ids(4, 60, 2000)
    release_first = threading.Event()
    first_computing = threading.Event()
    hold_prefill_steps(tiers, until=release_first, computing=first_computing)
    second_queued = held_back(scheduler, "second")
    first = Call(tiers, decode_request(prompt, tiers.prefill_address, 30, request_id="first"))
    first.start()
    assert first_computing.wait(HANG_GUARD_S)  # admitted on decode, its prefill under way
    second = Call(tiers, decode_request(prompt, tiers.prefill_address, 30, request_id="second"))
    second.start()
    assert second_queued.wait(HANG_GUARD_S)
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(decode_request(prompt, tiers.prefill_address, 30,
                                                  request_id="third"),
                                   timeout=HANG_GUARD_S))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full (1 waiting)" in info.value.details()
    assert ("retry-after", "1") in info.value.trailing_metadata()  # as HTTP's Retry-After
    assert not any(r.request_id.startswith("third") for r in scheduler.waiting)
    release_first.set()
    first.result(), second.result()
    assert first.error is None and second.error is None, (first.error, second.error)
    expected = hf_greedy(model, prompt, 30)
    assert tokens(first) == tokens(second) == expected
    # the queue emptied: a request arriving now is admitted
    fourth = Call(tiers, decode_request(prompt, tiers.prefill_address, 30, request_id="fourth"))
    fourth.start()
    assert fourth.result().error is None and tokens(fourth) == expected
    tiers.wait_idle()


def tokens(call: Call) -> list[int]:
    return [t for r in call.responses for t in r.token_ids]
