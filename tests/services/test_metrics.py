"""Each tier's /metrics (Prometheus text over HTTP, parsed with prometheus_client's parser):
counters move by what the requests did, KV usage returns to 0, transfer failures are counted by
cause, expired leases are counted; the gateway's view of them, an unreachable instance down."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.errors import NotFoundError
from gateway.backend import Backend
from gateway.convert import ModelSpec
from gateway.metrics import render
from gateway.routing import InstanceRegistry
from protos.tandem.v1 import instance_pb2, instance_pb2_grpc, kv_transfer_pb2
from tests.reference import prompt_ids

VOCAB = 2000
HANG_GUARD_S = 30.0
MAX_TOKENS = 6
LENGTH = {"finished_reason": "length"}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels but `tier`) -> value, from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=HANG_GUARD_S) as r:
        text = r.read().decode()
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "tier")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def metrics_ports(tiers) -> tuple[int, int]:
    """(prefill, decode) metrics ports, as GetInstanceInfo advertises them."""
    ports = []
    for address in (tiers.prefill_address, tiers.decode_address):
        with grpc.insecure_channel(address) as channel:
            info = instance_pb2_grpc.InstanceStub(channel).GetInstanceInfo(
                instance_pb2.GetInstanceInfoRequest(), timeout=HANG_GUARD_S)
        assert info.metrics_port > 0
        ports.append(info.metrics_port)
    return ports[0], ports[1]


def wait_for_kv_usage_zero(ports: tuple[int, ...]) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while any(value(scrape(p), "tandem:kv_cache_usage_perc") != 0 for p in ports):
        assert time.monotonic() < deadline, "KV cache usage never returned to 0"
        time.sleep(0.02)


def test_counters_follow_the_requests_and_kv_usage_returns_to_zero(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], metrics_port=0)
    prefill_port, decode_port = metrics_ports(tiers)
    # 1, 2, 0 and 2 full blocks of 16; the last prompt repeats the second: 2 blocks hit
    prompts = [prompt_ids(1, 20, VOCAB), prompt_ids(2, 33, VOCAB), prompt_ids(3, 7, VOCAB)]
    prompts.append(prompts[1])
    before = {port: scrape(port) for port in (prefill_port, decode_port)}
    responses = [tiers.generate(p, MAX_TOKENS, temperature=0.0, ignore_eos=True) for p in prompts]
    wait_for_kv_usage_zero((prefill_port, decode_port))
    prefill, decode = scrape(prefill_port), scrape(decode_port)

    def moved(samples: dict, port: int, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before[port], name, **labels)

    num, num_prompt = len(prompts), sum(map(len, prompts))
    num_bytes = sum(r[-1].timings.transfer_bytes for r in responses)
    assert num_bytes > 0 and all(r[-1].usage.completion_tokens == MAX_TOKENS for r in responses)
    assert moved(decode, decode_port, "tandem:prompt_tokens_total") == num_prompt
    assert moved(decode, decode_port, "tandem:generation_tokens_total") == num * MAX_TOKENS
    assert moved(decode, decode_port, "tandem:request_success_total", **LENGTH) == num
    assert moved(decode, decode_port, "tandem:kv_transfer_bytes_total") == num_bytes
    assert moved(decode, decode_port, "tandem:kv_transfer_duration_seconds_count") == num
    assert moved(decode, decode_port, "tandem:time_to_first_token_seconds_count") == num
    assert moved(decode, decode_port, "tandem:inter_token_latency_seconds_count") == \
        num * (MAX_TOKENS - 1)
    for phase in ("queue", "prefill", "decode"):
        assert moved(decode, decode_port, f"tandem:request_{phase}_time_seconds_count") == num
    assert moved(prefill, prefill_port, "tandem:prompt_tokens_total") == num_prompt
    assert moved(prefill, prefill_port, "tandem:generation_tokens_total") == num
    assert moved(prefill, prefill_port, "tandem:request_success_total", **LENGTH) == num
    assert moved(prefill, prefill_port, "tandem:kv_transfer_bytes_total") == num_bytes
    assert moved(prefill, prefill_port, "tandem:prefix_cache_queries_total") == 5 * 16
    assert moved(prefill, prefill_port, "tandem:prefix_cache_hits_total") == 2 * 16
    for samples in (prefill, decode):
        assert value(samples, "tandem:num_requests_running") == 0
        assert value(samples, "tandem:num_requests_waiting") == 0
        assert value(samples, "tandem:num_preemptions_total") == 0
        assert not [k for k in samples if k[0] == "tandem:kv_transfer_failures_total"]


def test_a_failed_transfer_is_counted_by_cause_on_both_tiers(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], prefill={"block_size": 8}, metrics_port=0)
    prefill_port, decode_port = metrics_ports(tiers)
    with pytest.raises(grpc.RpcError):  # the layouts disagree: the push is refused
        tiers.generate(prompt_ids(4, 12, VOCAB), MAX_TOKENS, temperature=0.0)
    wait_for_kv_usage_zero((prefill_port, decode_port))
    prefill, decode = scrape(prefill_port), scrape(decode_port)
    assert value(prefill, "tandem:kv_transfer_failures_total", cause="failed_precondition") == 1
    assert value(decode, "tandem:kv_transfer_failures_total", cause="internal") == 1
    for samples in (prefill, decode):
        assert value(samples, "tandem:request_success_total", finished_reason="error") == 1
        assert value(samples, "tandem:kv_transfer_bytes_total") == 0


def test_an_expired_lease_is_counted(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], metrics_port=0)
    _, decode_port = metrics_ports(tiers)
    leases = tiers.decode.engine.leases

    async def begin_after_expiry() -> None:  # lease methods run on the receiver's loop
        leases.create("late", [0], 1, timeout_s=-1.0)
        try:
            with pytest.raises(NotFoundError, match="expired"):
                leases.begin(kv_transfer_pb2.TransferBegin(transfer_id="late"))
        finally:
            leases.close("late")

    assert value(scrape(decode_port), "tandem:kv_leases_expired_total") == 0
    tiers.loop.run(begin_after_expiry())
    assert value(scrape(decode_port), "tandem:kv_leases_expired_total") == 1


def test_the_gateway_labels_each_instance_and_marks_an_unreachable_one_down(tiny_models,
                                                                            start_tiers):
    tiers = start_tiers(tiny_models["llama"], metrics_port=0)
    unreachable = "127.0.0.1:1"
    registry = InstanceRegistry([tiers.prefill_address], [tiers.decode_address, unreachable])
    backend = Backend(ModelSpec("m", 128, VOCAB, (), "LlamaForCausalLM"), registry, None)

    async def scrape_through_the_gateway() -> str:
        try:
            return (await render(backend)).decode()
        finally:
            await registry.close()

    samples = {(s.name, frozenset(s.labels.items())): s.value for family in
               text_string_to_metric_families(tiers.loop.run(scrape_through_the_gateway()))
               for s in family.samples}
    instances = [("prefill", tiers.prefill_address), ("decode", tiers.decode_address)]
    for tier, address in [*instances, ("decode", unreachable)]:
        labels = {"tier": tier, "instance": address}
        assert value(samples, "tandem:instance_up", **labels) == (address != unreachable)
    for tier, address in instances:
        labels = {"tier": tier, "instance": address}
        assert value(samples, "tandem:kv_cache_usage_perc", **labels) == 0
    assert value(samples, "tandem:num_requests_running", tier="gateway") == 0
