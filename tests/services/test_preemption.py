"""KV pressure on the decode tier, against real tiers: when the pool runs out, the newest running
request is preempted, recomputed locally and continues its stream; what every request produces
is exactly what it produces alone, and every block comes back, also for a request aborted while
it waits preempted."""

from __future__ import annotations

import threading

import grpc

from engine.request import RequestStatus
from protos.tandem.v1 import common_pb2, decode_pb2
from tests.reference import prompt_ids
from tests.services.test_failures import HANG_GUARD_S, Call

NUM_NEW_TOKENS = 50


def _request(i: int, prompt: list[int], prefill_address: str) -> decode_pb2.DecodeRequest:
    """Greedy for even i, seeded sampling for odd i; a fixed length (EOS ignored) so the
    requests really outgrow the pool."""
    sampling = common_pb2.SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True,
                                         temperature=0.0 if i % 2 == 0 else 1.0)
    if i % 2:
        sampling.seed = 1000 + i
    return decode_pb2.DecodeRequest(request_id=f"r{i}", prompt_token_ids=prompt,
                                    prefill_addresses=[prefill_address], sampling=sampling)


def _tokens(call: Call) -> list[int]:
    assert call.error is None, call.error
    assert call.responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    return [t for r in call.responses for t in r.token_ids]


def _pressured_tiers(tiny_models, start_tiers, num_blocks: int = 8):
    # blocks of 16 tokens on decode: one request is 20 + 50 tokens (5 blocks)
    return start_tiers(tiny_models["llama"],
                       decode={"num_kv_blocks": num_blocks, "max_model_len": 128})


def _run_all(tiers, requests) -> list[list[int]]:
    calls = [Call(tiers, request) for request in requests]
    for call in calls:
        call.start()
    return [_tokens(call.result()) for call in calls]


def test_preempted_requests_resume_with_exactly_the_tokens_they_would_have_produced(
        tiny_models, start_tiers):
    """32 requests (half greedy, half seeded) on a decode pool of a quarter of their need (40
    of 160 blocks) produce what they produce on a pool that holds them all."""
    roomy = start_tiers(tiny_models["llama"])
    tiers = _pressured_tiers(tiny_models, start_tiers, num_blocks=40)
    prompts = [prompt_ids(10 + i, 20, 2000) for i in range(32)]
    unpressured = _run_all(roomy, [_request(i, p, roomy.prefill_address)
                                   for i, p in enumerate(prompts)])
    assert roomy.decode.engine.parts.scheduler.num_preemptions == 0
    scheduler = tiers.decode.engine.parts.scheduler
    pressured = _run_all(tiers, [_request(i, p, tiers.prefill_address)
                                 for i, p in enumerate(prompts)])
    assert scheduler.num_preemptions > 0, "the pool never ran out: the test proves nothing"
    assert pressured == unpressured
    metrics = tiers.decode.engine.metrics.registry
    assert metrics.get_sample_value("tandem:num_preemptions_total",
                                    {"tier": "decode"}) == scheduler.num_preemptions
    tiers.wait_idle()


def test_a_request_aborted_while_preempted_frees_everything(tiny_models, start_tiers):
    tiers = _pressured_tiers(tiny_models, start_tiers)
    engine = tiers.decode.engine
    scheduler = engine.parts.scheduler
    # observe: hold the engine thread right after the first pass that preempted, until the
    # victim's client has gone; its abort is then the next thing the engine does
    real_schedule, preempted, client_gone = scheduler.schedule, [], threading.Event()

    def schedule():
        output = real_schedule()
        if output.preempted and not preempted:
            preempted.extend(output.preempted)
            if not client_gone.wait(HANG_GUARD_S):
                raise RuntimeError("test hang guard: the client never went away")
        return output

    scheduler.schedule = schedule
    requests = [_request(i, prompt_ids(10 + i, 20, 2000), tiers.prefill_address)
                for i in range(4)]
    streams = {r.request_id: tiers.stub().Generate(r, timeout=HANG_GUARD_S) for r in requests}
    results: dict[str, list | grpc.RpcError] = {}

    def consume(request_id, stream):
        try:
            results[request_id] = list(stream)
        except grpc.RpcError as exc:
            results[request_id] = exc

    threads = [threading.Thread(target=consume, args=item, daemon=True)
               for item in streams.items()]
    for thread in threads:
        thread.start()
    while not preempted:
        threads[0].join(0.01)
        assert any(t.is_alive() for t in threads), "every request ended without a preemption"
    [victim] = preempted[:1]
    assert victim.status is RequestStatus.WAITING and victim.block_ids == []
    victim_id = victim.request_id.split("#")[0]
    streams[victim_id].cancel()
    while any(s.request is victim for s in list(engine._streams.values())):
        threads[0].join(0.01)  # the decode tier saw the client go; its abort is queued
    client_gone.set()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert isinstance(results[victim_id], grpc.RpcError)
    assert results[victim_id].code() == grpc.StatusCode.CANCELLED
    assert victim.status is RequestStatus.FINISHED_ABORTED
    for request_id, result in results.items():
        if request_id != victim_id:
            assert not isinstance(result, grpc.RpcError), result
            assert sum(len(r.token_ids) for r in result) == NUM_NEW_TOKENS
    tiers.wait_idle()
