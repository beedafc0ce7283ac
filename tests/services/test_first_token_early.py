"""The first token ahead of the KV (FirstTokenEarly): a plain request's first token reaches the
client while its KV is still arriving, through its stop strings like any token; requests that
need more than the token (logprobs, n > 1, ...) keep the ordinary path; the receiver holds the
sender to its word."""

from __future__ import annotations

import threading
import time

import pytest

from engine.errors import InvalidRequestError
from engine.kv_cache import KVLayout, allocate_kv_cache
from kvtransfer.lease import LeaseState, LeaseTable
from protos.tandem.v1 import common_pb2, decode_pb2
from protos.tandem.v1 import kv_transfer_pb2 as pb
from tests.reference import hf_greedy, prompt_ids

VOCAB = 2000


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def watch(tiers, log: list, lock: threading.Lock, write_delay_s: float = 0.0):
    """Logs the decode tier's flag on each Prefill call, its KV writes (each held `write_delay_s`
    on the loop, so the transfer outlasts the engine thread's hop) and its deliveries."""
    engine = tiers.decode.engine
    real_write, real_deliver = engine.leases.write, engine._deliver
    real_prefill = engine.prefill.prefill

    def write(lease, batch):
        time.sleep(write_delay_s)
        real_write(lease, batch)
        with lock:
            log.append(("written", time.monotonic()))

    def deliver(request, output):
        with lock:
            log.append(("delivered", time.monotonic(), list(output.token_ids)))
        real_deliver(request, output)

    async def prefill(request, transfer_id, address, layout, timeout_s, first_token_early=False):
        log.append(("asked early", first_token_early))
        return await real_prefill(request, transfer_id, address, layout, timeout_s,
                                  first_token_early)

    engine.leases.write, engine._deliver, engine.prefill.prefill = write, deliver, prefill


def test_the_first_token_reaches_the_client_before_the_kv_is_in(tiny_models, start_tiers):
    model = tiny_models["llama"]
    tiers = start_tiers(model)
    prompt = prompt_ids(3, 40, VOCAB)  # one chunk: every block ships after the first token
    log, lock = [], threading.Lock()
    watch(tiers, log, lock, write_delay_s=1.0)
    responses = tiers.generate(prompt, 4, temperature=0.0)
    assert tokens_of(responses) == hf_greedy(model, prompt, 4)
    assert ("asked early", True) in log
    first = next(e for e in log if e[0] == "delivered")
    last_write = max(e[1] for e in log if e[0] == "written")
    assert first[2] == hf_greedy(model, prompt, 1) and first[1] < last_write
    assert [t for e in log if e[0] == "delivered" for t in e[2]] == tokens_of(responses)
    # the decode tier's own time to first token leaves out the KV write held for 1 s
    assert responses[-1].timings.time_to_first_token_s < 1.0


@pytest.mark.parametrize("sampling, n", [({"logprobs": 2}, 1), ({}, 2),
                                         ({"prompt_logprobs": 1}, 1)])
def test_requests_that_need_more_than_the_token_take_the_ordinary_path(tiny_models, start_tiers,
                                                                       sampling, n):
    model = tiny_models["llama"]
    tiers = start_tiers(model)
    prompt = prompt_ids(4, 20, VOCAB)
    log, lock = [], threading.Lock()
    watch(tiers, log, lock)
    request = decode_pb2.DecodeRequest(
        request_id="t", prompt_token_ids=prompt, n=n, prefill_addresses=[tiers.prefill_address],
        sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0.0, **sampling))
    responses = list(tiers.stub().Generate(request, timeout=120))
    assert log[0] == ("asked early", False)
    index0 = [t for r in responses if r.index == 0 for t in r.token_ids]
    assert index0 == hf_greedy(model, prompt, 3)


def test_max_tokens_one_and_stop_tokens_finish_on_the_ordinary_path(tiny_models, start_tiers):
    model = tiny_models["llama"]
    tiers = start_tiers(model)
    prompt = prompt_ids(5, 20, VOCAB)
    expected = hf_greedy(model, prompt, 2)
    log, lock = [], threading.Lock()
    watch(tiers, log, lock)
    assert tokens_of(tiers.generate(prompt, 1, temperature=0.0)) == expected[:1]
    assert log[0] == ("asked early", False)  # max_tokens 1: the first token ends it
    log.clear()
    # the first token is a stop token: streamed by the ordinary path, which finishes it
    responses = tiers.generate(prompt, 5, temperature=0.0, stop_token_ids=[expected[0]],
                               include_stop_str_in_output=True)
    assert log[0] == ("asked early", True)
    assert tokens_of(responses) == expected[:1] and responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert len([e for e in log if e[0] == "delivered"]) == 1


def test_an_early_token_that_completes_a_stop_string_ends_the_request(tiny_models, start_tiers):
    model = tiny_models["llama"]
    tiers = start_tiers(model)
    # a prompt whose first token shows text (byte-level tokens may show none on their own)
    prompt, first_text = next(
        (p, r[0].text) for p in (prompt_ids(seed, 20, VOCAB) for seed in range(20))
        if (r := tiers.generate(p, 2, temperature=0.0))[0].text.strip())
    log, lock = [], threading.Lock()
    watch(tiers, log, lock)
    stop = first_text.strip()[-1]
    responses = tiers.generate(prompt, 5, temperature=0.0, stop=[stop])
    assert log[0] == ("asked early", True)
    assert tokens_of(responses) == hf_greedy(model, prompt, 1)
    assert "".join(r.text for r in responses) == first_text[:first_text.index(stop)]
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    # the same with the stop string kept in the text
    responses = tiers.generate(prompt, 5, temperature=0.0, stop=[stop],
                               include_stop_str_in_output=True)
    assert "".join(r.text for r in responses) == first_text[:first_text.index(stop) + 1]


LAYOUT = KVLayout("float32", 4, 2, 2, 3)


def test_the_receiver_holds_the_sender_to_the_early_token():
    leases = LeaseTable(LAYOUT, allocate_kv_cache(LAYOUT, 4, "cpu"))
    told = []
    for transfer_id, second in (("twice", pb.FirstTokenEarly(token_id=7)),
                                ("other", pb.TransferComplete(first_token_id=8))):
        lease = leases.create(transfer_id, [1], num_tokens=4, timeout_s=30)
        lease.on_first_token = told.append
        leases.begin(pb.TransferBegin(version=pb.KV_CONTRACT_VERSION_1, transfer_id=transfer_id,
                                      layout=LAYOUT.to_pb(), num_tokens=4))
        leases.first_token(lease, pb.FirstTokenEarly(token_id=7))
        assert lease.early_first_token == 7 and lease.state is LeaseState.RECEIVING
        with pytest.raises(InvalidRequestError, match="twice|sent early"):
            if isinstance(second, pb.FirstTokenEarly):
                leases.first_token(lease, second)
            else:
                leases.complete(lease, second)
    assert told == [7, 7]


def test_a_retry_after_the_early_token_keeps_it_and_sends_it_once(tiny_models, start_tiers):
    """The first prefill instance sends the first token, then stalls before any block and goes
    away: the retry on the second recomputes the KV only; the client sees each token once."""
    import asyncio

    from tests.services.test_failures import HANG_GUARD_S, Call
    from tests.services.test_prefill_retry import num_retries, record_leases, request

    model = tiny_models["llama"]
    tiers = start_tiers(model, extra_prefills=[{}])
    [second] = tiers.extra_prefills
    prompt = prompt_ids(6, 40, VOCAB)
    created = record_leases(tiers)
    early_sent = threading.Event()

    async def stalled(plan, ready):  # the first instance's blocks never leave
        early_sent.set()
        await asyncio.Event().wait()
        yield b""

    tiers.prefill.engine.transport._encoded = stalled
    log, lock = [], threading.Lock()
    watch(tiers, log, lock)
    call = Call(tiers, request(prompt, [tiers.prefill_address, tiers.address_of(second)]))
    call.start()
    assert early_sent.wait(HANG_GUARD_S), "the first instance sent no blocks"
    tiers.loop.run(tiers.prefill.grpc.server.stop(0))
    call.result()
    assert call.error is None, call.error.details()
    expected = hf_greedy(model, prompt, 4)
    assert tokens_of(call.responses) == expected and num_retries(tiers) == 1
    first, retry = created
    assert first.early_first_token == expected[0] and first.state is LeaseState.FAILED
    assert first.bytes_received == 0 and retry.state is LeaseState.COMPLETE
    assert [t for e in log if e[0] == "delivered" for t in e[2]] == expected
    tiers.wait_idle()
