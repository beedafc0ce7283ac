"""A prefill instance that is unreachable, dies mid-transfer or stalls: the decode tier asks the
next prefill address once, on the same blocks under a fresh lease, and the output is identical to
an undisturbed run; when the retry fails too, or the fault is not one a retry can fix (a KV
contract fault), the request ends with an explicit error and every block is freed.

Real servers throughout. Where a test needs the system at a given point (a transfer under way),
it observes real components through thin wrappers that record or hold a step (the prefill
runner's `execute`, the decode lease table's `create` and `write`) and waits on events; timeouts
are hang guards only, never what is asserted."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest

from kvtransfer.lease import LeaseState
from protos.tandem.v1 import common_pb2, decode_pb2
from tests.reference import hf_greedy, prompt_ids
from tests.services.test_failures import (HANG_GUARD_S, Call, first_write,
                                          hold_after_first_step, record_steps)

PROMPT = prompt_ids(3, 40, 2000)


@pytest.fixture
def closed_port():
    """A factory of host:port addresses nothing listens on (connections are refused)."""
    def make() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{s.getsockname()[1]}"
    return make


def request(prompt, addresses, max_tokens=4, request_id="r"):
    return decode_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt, prefill_addresses=addresses,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))


def tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def num_retries(tiers) -> float:
    return tiers.decode.engine.metrics.registry.get_sample_value(
        "tandem:prefill_retries_total", {"tier": "decode"})


def record_leases(tiers) -> list:
    """Every lease the decode instance creates, in order."""
    leases = tiers.decode.engine.leases
    created = []
    real_create = leases.create

    def create(*args, **kwargs):
        created.append(real_create(*args, **kwargs))
        return created[-1]

    leases.create = create
    return created


def test_unreachable_first_prefill_is_retried_on_the_next(tiny_models, start_tiers, closed_port,
                                                          caplog):
    model = tiny_models["llama"]
    tiers = start_tiers(model)
    created = record_leases(tiers)
    with caplog.at_level("WARNING", logger="decode"):
        responses = list(tiers.stub().Generate(
            request(PROMPT, [closed_port(), tiers.prefill_address]), timeout=HANG_GUARD_S))
    assert tokens(responses) == hf_greedy(model, PROMPT, 4)
    assert num_retries(tiers) == 1
    assert any("retrying on " + tiers.prefill_address in m for m in caplog.messages)
    # the failed attempt's lease was closed; the retry's is fresh, on the same blocks
    first, retry = created
    assert first.state is LeaseState.FAILED and first.bytes_received == 0
    assert retry.transfer_id == first.transfer_id + "#retry1"
    assert retry.state is LeaseState.COMPLETE and retry.block_ids == first.block_ids
    assert len(tiers.decode.engine.leases) == 0
    tiers.wait_idle()


def test_prefill_dying_mid_transfer_is_retried_on_the_next(tiny_models, start_tiers):
    # chunks of one block on the first prefill instance: after its first step its engine is
    # held, so it dies with block 0 delivered and 56 blocks still to compute
    model = tiny_models["llama"]
    tiers = start_tiers(model, prefill={"max_num_batched_tokens": 16}, extra_prefills=[{}])
    [second] = tiers.extra_prefills
    prompt = prompt_ids(2, 900, 2000)
    leases = tiers.decode.engine.leases
    created = record_leases(tiers)
    peer_gone = threading.Event()
    first_block_written = first_write(leases)
    hold_after_first_step(tiers, release=peer_gone)
    call = Call(tiers, request(prompt, [tiers.prefill_address, tiers.address_of(second)]))
    call.start()
    assert first_block_written.wait(HANG_GUARD_S), "the transfer never started"
    tiers.loop.run(tiers.prefill.grpc.server.stop(0))  # the peer goes away, no grace
    peer_gone.set()
    call.result()
    assert call.error is None, call.error.details()
    assert tokens(call.responses) == hf_greedy(model, prompt, 4)
    assert num_retries(tiers) == 1
    first, retry = created
    bytes_per_block = tiers.decode.engine.parts.layout.bytes_per_block
    assert first.state is LeaseState.FAILED and 0 < first.bytes_received < 57 * bytes_per_block
    assert retry.state is LeaseState.COMPLETE and retry.bytes_received == 57 * bytes_per_block
    assert retry.block_ids == first.block_ids and len(leases) == 0
    tiers.wait_idle()  # the dead instance's engine, released, pushed into a closed lease


def test_stalled_first_prefill_is_retried_after_the_kv_timeout(tiny_models, start_tiers,
                                                               silent_peer):
    model = tiny_models["llama"]
    tiers = start_tiers(model, kv_timeout_s=1.0)
    responses = list(tiers.stub().Generate(request(PROMPT, [silent_peer, tiers.prefill_address]),
                                           timeout=HANG_GUARD_S))
    assert tokens(responses) == hf_greedy(model, PROMPT, 4)
    assert num_retries(tiers) == 1
    tiers.wait_idle()


def test_a_failed_retry_ends_with_unavailable_and_frees_blocks(tiny_models, start_tiers,
                                                               closed_port):
    tiers = start_tiers(tiny_models["llama"])
    created = record_leases(tiers)
    addresses = [closed_port(), closed_port(), tiers.prefill_address]  # one retry, no more
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(request(PROMPT, addresses), timeout=HANG_GUARD_S))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"prefill instance {addresses[1]}" in info.value.details()
    assert num_retries(tiers) == 1 and len(created) == 2
    assert all(lease.state is LeaseState.FAILED for lease in created)
    assert len(tiers.decode.engine.leases) == 0
    tiers.wait_idle()
    scheduler = tiers.decode.engine.parts.scheduler
    assert not (scheduler.waiting or scheduler.waiting_for_kv or scheduler.running)


def test_a_kv_contract_fault_is_not_retried(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], prefill={"block_size": 8},  # layouts disagree
                        extra_prefills=[{}])
    [second] = tiers.extra_prefills
    second_steps = record_steps(second)
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(
            request(PROMPT, [tiers.prefill_address, tiers.address_of(second)]),
            timeout=HANG_GUARD_S))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "block_size" in info.value.details()
    assert num_retries(tiers) == 0 and second_steps == []
    tiers.wait_idle()


@pytest.mark.parametrize("fault", ["stalled", "unreachable"])
def test_16_concurrent_requests_over_a_failed_first_prefill_all_complete(
        tiny_models, start_tiers, silent_peer, closed_port, fault):
    """16 requests at once whose first prefill address stalls (a silent peer: the per-attempt
    KV timeout) or refuses connections: each is retried once on the second, and every output
    is transformers' exact greedy."""
    model = tiny_models["llama"]
    tiers = start_tiers(model, kv_timeout_s=1.0)
    first = silent_peer if fault == "stalled" else closed_port()
    prompts = [prompt_ids(800 + i, 10 + 3 * i, 2000) for i in range(16)]
    calls = [Call(tiers, request(p, [first, tiers.prefill_address], request_id=f"c{i}"))
             for i, p in enumerate(prompts)]
    for call in calls:
        call.start()
    for prompt, call in zip(prompts, calls):
        call.result()
        assert call.error is None, call.error
        assert tokens(call.responses) == hf_greedy(model, prompt, 4)
    assert num_retries(tiers) == 16
    tiers.wait_idle()
