"""Faults injected on the decode -> prefill link with tests/faults.py's proxy, against real
tiers: a slow link still gives exact tokens; a stalled link ends in DEADLINE_EXCEEDED after the
KV timeout; a link cut while prefill computes ends in UNAVAILABLE at once. Every block returns
to its pool (start_tiers checks after each test)."""

from __future__ import annotations

import threading

import grpc
import pytest

from protos.tandem.v1 import common_pb2, decode_pb2
from tests.faults import FaultProxy
from tests.reference import hf_greedy, prompt_ids
from tests.services.test_failures import HANG_GUARD_S, hold_after_first_step

KV_TIMEOUT_S = 2.0


def request_via(prefill_address: str, prompt: list[int], max_tokens: int = 6):
    return decode_pb2.DecodeRequest(
        request_id="fault", prompt_token_ids=prompt, prefill_addresses=[prefill_address],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))


@pytest.fixture
def proxied(tiny_models, start_tiers):
    """(tiers, proxy): the proxy forwards to the prefill instance's gRPC port."""
    tiers = start_tiers(tiny_models["llama"], prefill={"max_num_batched_tokens": 16},
                        kv_timeout_s=KV_TIMEOUT_S)
    proxy = FaultProxy(tiers.prefill_address)
    yield tiers, proxy
    proxy.close()


def test_a_slow_link_still_gives_exact_tokens(tiny_models, proxied):
    tiers, proxy = proxied
    proxy.delay_s = 0.02
    prompt = prompt_ids(31, 40, 2000)
    responses = list(tiers.stub().Generate(request_via(proxy.address, prompt),
                                           timeout=HANG_GUARD_S))
    assert [t for r in responses for t in r.token_ids] == hf_greedy(tiny_models["llama"], prompt, 6)
    assert proxy.num_connections >= 1  # it did go through the proxy


def test_a_stalled_link_times_out_with_the_kv_timeout(proxied):
    tiers, proxy = proxied
    proxy.stall()
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(request_via(proxy.address, prompt_ids(32, 20, 2000)),
                                   timeout=HANG_GUARD_S))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"did not arrive within {KV_TIMEOUT_S:.1f} s" in info.value.details()
    assert len(tiers.decode.engine.leases) == 0
    proxy.resume()


def test_a_link_cut_while_prefill_computes_fails_at_once(proxied):
    tiers, proxy = proxied
    cut_done = threading.Event()
    computing = hold_after_first_step(tiers, release=cut_done)  # held after its first chunk
    outcome: list = []

    def call() -> None:
        try:
            list(tiers.stub().Generate(request_via(proxy.address, prompt_ids(33, 300, 2000)),
                                       timeout=HANG_GUARD_S))
            outcome.append(None)
        except grpc.RpcError as error:
            outcome.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    assert computing.wait(HANG_GUARD_S), "prefill never started"
    proxy.cut()
    thread.join(HANG_GUARD_S)
    cut_done.set()
    assert outcome and outcome[0] is not None, "the request succeeded over a cut link"
    assert outcome[0].code() == grpc.StatusCode.UNAVAILABLE, outcome[0].details()
    assert len(tiers.decode.engine.leases) == 0


@pytest.fixture
def kv_proxied(tiny_models, start_tiers):
    """(tiers, proxy): the prefill tier pushes KV through the proxy to decode's KV port (decode
    names the proxy as its KV endpoint in its Prefill calls)."""
    tiers = start_tiers(tiny_models["llama"], prefill={"max_num_batched_tokens": 16},
                        kv_timeout_s=KV_TIMEOUT_S)
    client = tiers.decode.engine.prefill
    proxy = FaultProxy(client.kv_transfer_address)
    client.kv_transfer_address = proxy.address
    yield tiers, proxy
    proxy.close()


def test_a_stalled_kv_stream_fails_within_the_kv_timeout_on_both_tiers(tiny_models, kv_proxied):
    tiers, proxy = kv_proxied
    prompt = prompt_ids(34, 120, 2000)
    responses = list(tiers.stub().Generate(request_via(tiers.prefill_address, prompt),
                                           timeout=HANG_GUARD_S))  # the path works first
    assert [t for r in responses for t in r.token_ids] == hf_greedy(tiny_models["llama"], prompt, 6)
    proxy.stall()
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(request_via(tiers.prefill_address, prompt_ids(35, 120, 2000)),
                                   timeout=HANG_GUARD_S))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(tiers.decode.engine.leases) == 0
    proxy.cut()  # the stalled stream goes away; start_tiers then checks both pools are free


def test_a_kv_stream_cut_mid_transfer_fails_the_request(kv_proxied):
    tiers, proxy = kv_proxied
    bytes_per_block = tiers.decode.engine.parts.layout.bytes_per_block
    proxy.cut_after_bytes = 3 * bytes_per_block  # a few blocks in
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(request_via(tiers.prefill_address, prompt_ids(36, 600, 2000)),
                                   timeout=HANG_GUARD_S))
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), \
        info.value.details()
    assert "KV transfer" in info.value.details() or "prefill" in info.value.details()
    assert len(tiers.decode.engine.leases) == 0


@pytest.mark.parametrize("fault", ["slow", "stall_then_resume", "stall"])
def test_kv_stream_faults_under_16_concurrent_requests(tiny_models, kv_proxied, fault):
    """16 requests at once over a KV link that is slow, stalls for less than the KV timeout, or
    stalls for good: every request ends within its deadline, either with exactly transformers'
    tokens or (the lasting stall) with DEADLINE_EXCEEDED after the KV timeout; no lease is left
    and (start_tiers checks) every block of both pools is free."""
    tiers, proxy = kv_proxied
    prompts = [prompt_ids(700 + i, 40 + 5 * i, 2000) for i in range(16)]
    if fault == "slow":
        proxy.delay_s = 0.02
    else:
        proxy.stall()
    outcomes: list = [None] * len(prompts)

    def call(i: int) -> None:
        try:
            outcomes[i] = list(tiers.stub().Generate(
                request_via(tiers.prefill_address, prompts[i]), timeout=HANG_GUARD_S))
        except grpc.RpcError as error:
            outcomes[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    if fault == "stall_then_resume":
        threading.Timer(KV_TIMEOUT_S / 4, proxy.resume).start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
        assert not thread.is_alive(), "a request hung"
    for prompt, outcome in zip(prompts, outcomes):
        if fault == "stall":
            assert isinstance(outcome, grpc.RpcError), "a request got through a stalled link"
            assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED, outcome.details()
        else:
            assert not isinstance(outcome, grpc.RpcError), outcome
            assert [t for r in outcome for t in r.token_ids] == \
                hf_greedy(tiny_models["llama"], prompt, 6)
    assert len(tiers.decode.engine.leases) == 0
    proxy.cut()  # a stalled stream goes away; start_tiers then checks both pools are free
