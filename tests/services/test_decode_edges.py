"""Decode-tier edges found in review, each against real tiers: the text of a stop token, a stop
string on the last allowed token, leased blocks reported as taken, the KV lease outliving its
leg's deadline (a late transfer fails the leg with DEADLINE_EXCEEDED, not the lease with
NOT_FOUND), internal faults reported as INTERNAL, and an engine that dies (decode's or
prefill's)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode_service.engine import LEASE_GRACE_S
from engine.request import RequestStatus
from engine.tokenizer import Tokenizer
from kvtransfer.lease import LeaseState
from protos.tandem.v1 import common_pb2, decode_pb2, instance_pb2, instance_pb2_grpc
from tests.reference import hf_greedy, prompt_ids
from tests.services.test_failures import hold_prefill_steps

VOCAB = 2000
PROMPT = prompt_ids(21, 12, VOCAB)
HANG_GUARD_S = 30.0


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def text_of(responses) -> str:
    return "".join(r.text for r in responses)


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def llama_tiers(tiny_models, start_tiers):
    return start_tiers(tiny_models["llama"])


@pytest.fixture
def tokenizer(tiny_models) -> Tokenizer:
    return Tokenizer.from_dir(tiny_models["llama"])


def test_a_stop_token_ends_the_text_without_its_own_text(tiny_models, llama_tiers, tokenizer):
    greedy = hf_greedy(tiny_models["llama"], PROMPT, 8)
    stop_at = 3  # the 4th generated token becomes a stop token id
    assert greedy[stop_at] not in greedy[:stop_at]
    responses = llama_tiers.generate(PROMPT, 8, temperature=0.0, stop_token_ids=[greedy[stop_at]])
    assert tokens_of(responses) == greedy[:stop_at + 1]  # the id is reported, as vLLM does
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    full = tokenizer.decode(PROMPT + greedy[:stop_at])
    assert text_of(responses) == full[len(tokenizer.decode(PROMPT)):]


def test_a_stop_string_on_the_last_allowed_token_is_stop(tiny_models, llama_tiers, tokenizer):
    max_tokens = 5
    plain = llama_tiers.generate(PROMPT, max_tokens, temperature=0.0, ignore_eos=True)
    assert plain[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    last_text = tokenizer.decode(PROMPT + tokens_of(plain))[len(tokenizer.decode(PROMPT + tokens_of(plain)[:-1])):]
    stop = last_text.strip() or last_text
    assert stop and stop not in text_of(plain)[:-len(last_text)]
    stopped = llama_tiers.generate(PROMPT, max_tokens, temperature=0.0, ignore_eos=True, stop=[stop])
    assert tokens_of(stopped) == tokens_of(plain)
    assert stopped[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert stop not in text_of(stopped)


def _instance_info(tiers) -> instance_pb2.InstanceInfo:
    stub = instance_pb2_grpc.InstanceStub(grpc.insecure_channel(tiers.decode_address))
    return stub.GetInstanceInfo(instance_pb2.GetInstanceInfoRequest(), timeout=HANG_GUARD_S)


def test_leased_blocks_are_not_reported_free_and_the_lease_outlives_the_leg(
        tiny_models, start_tiers, silent_peer):
    tiers = start_tiers(tiny_models["llama"], kv_timeout_s=20.0)
    engine = tiers.decode.engine
    request = decode_pb2.DecodeRequest(
        request_id="held", prompt_token_ids=PROMPT, prefill_addresses=[silent_peer],
        sampling=common_pb2.SamplingParams(max_tokens=100, temperature=0.0))
    call = tiers.stub().Generate(request, timeout=HANG_GUARD_S)  # waits on a silent prefill
    try:
        wait_for(lambda: len(engine.leases) == 1, "the KV lease")
        # the 12-token prompt's block is taken (and leased); max_tokens reserves nothing
        info = _instance_info(tiers)
        assert info.num_free_kv_blocks == info.num_kv_blocks - 1
        stream = next(iter(engine._streams.values()))
        lease = next(iter(engine.leases._leases.values()))
        # the lease outlives the leg by the grace (the leg's deadline was taken first)
        assert lease.expires_at >= stream.leg_deadline + LEASE_GRACE_S
    finally:
        call.cancel()
    tiers.wait_idle()
    assert _instance_info(tiers).num_free_kv_blocks == _instance_info(tiers).num_kv_blocks


def test_a_transfer_beginning_just_after_the_legs_budget_fails_the_leg_not_the_lease(
        tiny_models, start_tiers):
    """The prefill instance's push reaches the receiver just after the leg's budget, while the
    leg has not yet timed out (the decode loop was busy until then: here the receiver's begin
    holds it, so the leg's timer cannot fire first). The lease, which outlives the leg by
    LEASE_GRACE_S, still accepts the transfer; the leg then times out on its own clock and the
    client gets DEADLINE_EXCEEDED. The lease never expires, so the prefill tier never sees
    NOT_FOUND for it. The prefill step is held until the client has its answer, so the transfer
    cannot complete first."""
    budget_s, late_s = 2.0, 0.2
    tiers = start_tiers(tiny_models["llama"], kv_timeout_s=budget_s)
    engine, leases = tiers.decode.engine, tiers.decode.engine.leases
    release_prefill = threading.Event()
    hold_prefill_steps(tiers, until=release_prefill, computing=threading.Event())
    real_begin, begun = leases.begin, []

    def late_begin(begin):
        [stream] = engine._streams.values()
        lease = leases._leases.get(begin.transfer_id)
        begun.append(lease and lease.state)  # PENDING: the push arrived within the budget
        while time.monotonic() < stream.leg_deadline + late_s:
            time.sleep(0.01)  # the decode loop is busy past the leg's budget
        try:
            accepted = real_begin(begin)
        except Exception as exc:  # noqa: BLE001 - recorded, then the receiver answers it
            begun.append(exc)
            raise
        begun.append(accepted.state)
        return accepted

    leases.begin = late_begin
    try:
        with pytest.raises(grpc.RpcError) as info:
            tiers.generate(PROMPT, 4, temperature=0.0)
    finally:
        release_prefill.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive" in info.value.details()
    assert begun == [LeaseState.PENDING, LeaseState.RECEIVING]  # accepted, after the budget
    assert leases.num_expired == 0


def test_a_kv_contract_fault_reaches_the_user_as_internal(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], prefill={"block_size": 8})  # layouts disagree
    with pytest.raises(grpc.RpcError) as info:
        tiers.generate(PROMPT, 4, temperature=0.0)
    assert info.value.code() == grpc.StatusCode.INTERNAL  # HTTP 500, not the user's 400
    assert "block_size" in info.value.details() and "FAILED_PRECONDITION" in info.value.details()


def test_an_engine_that_dies_fails_its_requests_and_stops_serving(tiny_models, start_tiers,
                                                                  silent_peer):
    tiers = start_tiers(tiny_models["llama"], kv_timeout_s=20.0)
    engine = tiers.decode.engine
    request = decode_pb2.DecodeRequest(
        request_id="victim", prompt_token_ids=PROMPT, prefill_addresses=[silent_peer],
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0))
    call = tiers.stub().Generate(request, timeout=HANG_GUARD_S)
    wait_for(lambda: len(engine.leases) == 1, "the request to wait for its KV")
    scheduler = engine.scheduler

    def broken_schedule():
        raise RuntimeError("scheduler state is corrupt")

    scheduler.schedule = broken_schedule
    engine.core.call(lambda: None)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode engine failed" in info.value.details()
    wait_not_serving(tiers.decode_address)
    with pytest.raises(grpc.RpcError) as info:
        tiers.generate(PROMPT, 4, temperature=0.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    free_what_the_dead_engine_held(scheduler)


def test_a_prefill_engine_that_dies_fails_its_prefills_and_stops_serving(tiny_models,
                                                                         start_tiers):
    """The prefill tier's scheduler raises in the middle of a chunked prefill (after its first
    of 5 chunks): the request fails with UNAVAILABLE through decode, the prefill instance says
    NOT_SERVING and refuses the next prefill with UNAVAILABLE."""
    tiers = start_tiers(tiny_models["llama"], prefill={"max_num_batched_tokens": 8})
    scheduler = tiers.prefill.engine.parts.scheduler
    real_schedule = scheduler.schedule

    def broken_schedule():
        if any(0 < r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
            raise RuntimeError("scheduler state is corrupt")
        return real_schedule()

    scheduler.schedule = broken_schedule
    prompt = prompt_ids(22, 40, VOCAB)
    with pytest.raises(grpc.RpcError) as info:
        tiers.generate(prompt, 4, temperature=0.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "prefill engine failed: RuntimeError: scheduler state is corrupt" in info.value.details()
    [held] = scheduler.running  # failed mid-prefill, holding its blocks
    assert held.num_computed_tokens == 8
    wait_not_serving(tiers.prefill_address)
    with pytest.raises(grpc.RpcError) as info:
        tiers.generate(prompt, 4, temperature=0.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "prefill instance's engine failed" in info.value.details()
    free_what_the_dead_engine_held(scheduler)


def wait_not_serving(address: str) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
             == health_pb2.HealthCheckResponse.NOT_SERVING, f"{address} health NOT_SERVING")


def free_what_the_dead_engine_held(scheduler) -> None:
    """A dead engine cannot free its requests' blocks: free them as the process exit would (and
    give the scheduler its own schedule() back)."""
    scheduler.__dict__.pop("schedule", None)
    for request in list(scheduler.waiting_for_kv.values()) + list(scheduler.running):
        scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        scheduler.free_blocks(request)


def test_a_request_filling_the_context_is_served_when_the_model_outgrows_the_pool(
        tiny_models, start_tiers):
    """What the gateway sends without max_tokens (the rest of the context) on a model whose
    context (1024) exceeds the KV pool (8 blocks = 128 tokens): max_model_len is lowered to what
    the pool holds, and such requests wait for each other instead of being refused."""
    small = {"num_kv_blocks": 8}
    tiers = start_tiers(tiny_models["llama"], prefill=small, decode=small)
    info = _instance_info(tiers)
    assert info.max_model_len == 128
    max_tokens = info.max_model_len - len(PROMPT)
    results: list = [None, None]

    def run(i: int) -> None:
        results[i] = tiers.generate(PROMPT, max_tokens, temperature=0.0, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    for responses in results:
        assert responses is not None and len(tokens_of(responses)) == max_tokens
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert tokens_of(results[0]) == tokens_of(results[1])


def test_a_reader_that_does_not_read_holds_no_kv(tiny_models, llama_tiers):
    """The engine never waits for a stream's reader: a client that reads nothing until its
    request has finished finds every block already back in the pool, and then gets the whole,
    exact output. What waits for it is the request's outputs, at most max_tokens of them."""
    tiers = llama_tiers
    engine = tiers.decode.engine
    request = decode_pb2.DecodeRequest(
        request_id="unread", prompt_token_ids=PROMPT, prefill_addresses=[tiers.prefill_address],
        sampling=common_pb2.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    call = tiers.stub().Generate(request, timeout=HANG_GUARD_S)  # started, not read
    wait_for(lambda: len(engine._streams) == 1, "the request to reach the decode tier")
    [stream] = engine._streams.values()
    wait_for(lambda: stream.request.status.finished, "the request to finish unread")
    tiers.wait_idle()  # its blocks are back while nobody has read a token
    outputs = list(call)
    assert len(tokens_of(outputs)) == 100 and len(outputs) <= 100
    assert outputs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert tokens_of(outputs)[:20] == hf_greedy(tiny_models["llama"], PROMPT, 20)
