"""Every exit path of the KV handoff returns the blocks: a prefill peer that never answers
(timeout), a prefill peer that dies mid-transfer, a request queued behind a full pool, and a
request the pool can never hold.

Where a test needs the system at a given point (a transfer under way, a request holding the
pool), it observes real components through thin wrappers that record or hold a step (the
prefill runner's `execute`, the decode lease table's `write`, the decode scheduler's
`schedule`) and waits on events; timeouts are hang guards only, never what is asserted."""

from __future__ import annotations

import threading

import grpc
import pytest

from engine.request import RequestStatus
from kvtransfer.lease import LeaseState
from protos.tandem.v1 import common_pb2, decode_pb2
from tests.reference import hf_greedy, prompt_ids

HANG_GUARD_S = 60


def decode_request(prompt, prefill_address, max_tokens=4, request_id="f"):
    return decode_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt, prefill_addresses=[prefill_address],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))


class Call(threading.Thread):
    """Decode.Generate on a thread: `responses` or `error` once joined."""

    def __init__(self, tiers, request):
        super().__init__(daemon=True)
        self.tiers, self.request = tiers, request
        self.responses, self.error = None, None

    def run(self):
        try:
            self.responses = list(self.tiers.stub().Generate(self.request, timeout=HANG_GUARD_S))
        except grpc.RpcError as exc:
            self.error = exc

    def result(self):
        self.join(HANG_GUARD_S)
        assert not self.is_alive(), "the call did not end"
        return self


def hold_prefill_steps(tiers, until: threading.Event, computing: threading.Event):
    """Every prefill step sets `computing`, then waits for `until` (the real step runs after)."""
    runner = tiers.prefill.engine.parts.runner
    real_execute = runner.execute

    def execute(chunks):
        computing.set()
        if not until.wait(HANG_GUARD_S):
            raise RuntimeError("test hang guard: prefill step held too long")
        return real_execute(chunks)

    runner.execute = execute


def hold_after_first_step(tiers, release: threading.Event) -> threading.Event:
    """The prefill engine runs its first step, then holds every later one until `release` (a
    hang guard raises past HANG_GUARD_S). Returns an event set once the first step ran."""
    runner = tiers.prefill.engine.parts.runner
    real_execute, first_ran = runner.execute, threading.Event()

    def execute(chunks):
        if first_ran.is_set() and not release.wait(HANG_GUARD_S):
            raise RuntimeError("test hang guard: prefill step held too long")
        first_ran.set()
        return real_execute(chunks)

    runner.execute = execute
    return first_ran


def record_steps(prefill) -> list:
    """The chunks of every step `prefill` (a PrefillServer) runs from now on, in order."""
    runner, steps = prefill.engine.parts.runner, []
    real_execute = runner.execute
    runner.execute = lambda chunks: steps.append(chunks) or real_execute(chunks)
    return steps


def first_write(leases, written: list | None = None) -> threading.Event:
    """An event set once decode's lease table wrote a block segment (each lease written to is
    appended to `written`)."""
    real_write, wrote = leases.write, threading.Event()

    def write(lease, batch):
        real_write(lease, batch)
        if written is not None:
            written.append(lease)
        wrote.set()

    leases.write = write
    return wrote


def held_back(scheduler, prefix: str) -> threading.Event:
    """An event set after a scheduling pass that left a request whose id starts with `prefix`
    waiting for admission."""
    real_schedule, seen = scheduler.schedule, threading.Event()

    def schedule():
        output = real_schedule()
        if any(r.request_id.startswith(prefix) for r in scheduler.waiting):
            seen.set()
        return output

    scheduler.schedule = schedule
    return seen


def test_silent_prefill_peer_times_out_and_frees_blocks(tiny_models, start_tiers, silent_peer):
    tiers = start_tiers(tiny_models["llama"], kv_timeout_s=1.0)
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(decode_request([5, 6, 7], silent_peer), timeout=HANG_GUARD_S))
    # the leg ended by the configured KV timeout (1 s), not by the call's own deadline
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive within 1.0 s" in info.value.details()
    assert len(tiers.decode.engine.leases) == 0  # closed before the error was delivered
    tiers.wait_idle()
    scheduler = tiers.decode.engine.parts.scheduler
    assert not (scheduler.waiting or scheduler.waiting_for_kv or scheduler.running)


def test_prefill_dying_mid_transfer_fails_the_request_and_frees_blocks(tiny_models, start_tiers):
    # chunks of one block: after the first step the prefill engine is held, so the peer dies
    # with block 0 delivered and 56 blocks still to compute
    tiers = start_tiers(tiny_models["llama"], prefill={"max_num_batched_tokens": 16})
    prompt = prompt_ids(2, 900, 2000)
    leases = tiers.decode.engine.leases
    peer_gone = threading.Event()
    written = []
    first_block_written = first_write(leases, written)
    hold_after_first_step(tiers, release=peer_gone)
    call = Call(tiers, decode_request(prompt, tiers.prefill_address))
    call.start()
    assert first_block_written.wait(HANG_GUARD_S), "the transfer never started"
    tiers.loop.run(tiers.prefill.grpc.server.stop(0))  # the peer goes away, no grace
    peer_gone.set()
    call.result()
    assert call.error is not None, "the request succeeded without its prefill peer"
    # the peer is down (retryable, 503), and the message says which one
    assert call.error.code() == grpc.StatusCode.UNAVAILABLE, call.error.details()
    assert f"prefill instance {tiers.prefill_address}" in call.error.details()
    lease = written[0]  # the decode side's lease: failed, with a reason, and incomplete
    assert lease.state is LeaseState.FAILED and lease.failure
    bytes_per_block = tiers.decode.engine.parts.layout.bytes_per_block
    assert len(lease.block_ids) == 57 and lease.bytes_received < 57 * bytes_per_block
    assert len(leases) == 0
    tiers.wait_idle()


def test_request_waits_for_blocks_then_runs(tiny_models, start_tiers):
    # decode's pool of 6 blocks (one 96-token sequence) holds one 60-token prompt (4 blocks) at
    # a time, with the 1-block watermark kept free: the second request is not admitted (no
    # blocks, no lease, no prefill) until the first has finished and freed its blocks; then it
    # runs
    model = tiny_models["llama"]
    tiers = start_tiers(model, decode={"num_kv_blocks": 6, "max_model_len": 96})
    scheduler = tiers.decode.engine.parts.scheduler
    prompt = prompt_ids(4, 60, 2000)
    release_first = threading.Event()
    first_computing = threading.Event()
    hold_prefill_steps(tiers, until=release_first, computing=first_computing)

    # observe: the decode scheduler kept "second" waiting after a scheduling pass
    second_held_back = held_back(scheduler, "second")
    # observe: what the first request looked like when the second one reached the prefill tier
    first_when_second_prefilled = []
    runner = tiers.prefill.engine.parts.runner
    held_execute = runner.execute

    def execute(chunks):
        for request, _ in chunks:
            if request.request_id.startswith("second") and not first_when_second_prefilled:
                first_when_second_prefilled.append((first.status.finished, list(first.block_ids)))
        return held_execute(chunks)

    runner.execute = execute

    a = Call(tiers, decode_request(prompt, tiers.prefill_address, 30, request_id="first"))
    a.start()
    assert first_computing.wait(HANG_GUARD_S)  # admitted on decode, its prefill under way
    [first] = scheduler.waiting_for_kv.values()
    b = Call(tiers, decode_request(prompt, tiers.prefill_address, 30, request_id="second"))
    b.start()
    assert second_held_back.wait(HANG_GUARD_S)
    # the first holds 4 prompt blocks; the second needs 4 more and the watermark
    assert scheduler.pool.num_free_blocks == 2 and scheduler.watermark_blocks == 1
    [second] = scheduler.waiting
    assert second.status is RequestStatus.WAITING and second.block_ids == []
    assert len(tiers.decode.engine.leases) == 1  # the first's only
    prefill_running = tiers.prefill.engine.parts.scheduler.running
    assert [r.request_id.split("#")[0] for r in prefill_running] == ["first"]
    release_first.set()
    a.result(), b.result()
    assert a.error is None and b.error is None, (a.error, b.error)
    assert first_when_second_prefilled == [(True, [])]  # admitted only after the first freed
    expected = hf_greedy(model, prompt, 30)
    for call in (a, b):
        assert [t for r in call.responses for t in r.token_ids] == expected
        assert call.responses[-1].usage.completion_tokens == len(expected)


def test_request_larger_than_the_pool_is_refused_before_any_work(tiny_models, start_tiers):
    # a decode pool of 2 blocks serves 32-token sequences (the context length is lowered to what
    # the pool holds), so a 60-token prompt is refused up front: a client error naming the limit
    tiers = start_tiers(tiny_models["llama"], decode={"num_kv_blocks": 2})
    steps = record_steps(tiers.prefill)
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(decode_request(prompt_ids(1, 60, 2000), tiers.prefill_address),
                                   timeout=HANG_GUARD_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "60 tokens" in info.value.details() and "31" in info.value.details()
    assert steps == [] and len(tiers.decode.engine.leases) == 0
