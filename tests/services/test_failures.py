"""Every exit path of the KV handoff returns the blocks: a prefill peer that never answers
(timeout), a prefill peer that dies mid-transfer, and a request queued behind a full pool."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from protos.tandem.v1 import common_pb2, decode_pb2
from tests.reference import prompt_ids


def decode_request(prompt, prefill_address, max_tokens=4):
    return decode_pb2.DecodeRequest(
        request_id="f", prompt_token_ids=prompt, prefill_addresses=[prefill_address],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))


@pytest.fixture
def silent_peer():
    """A TCP port that accepts connections and never says anything."""
    server = socket.create_server(("127.0.0.1", 0))
    conns = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in conns:
        conn.close()
    server.close()


def test_silent_prefill_peer_times_out_and_frees_blocks(tiny_models, start_tiers, silent_peer):
    tiers = start_tiers(tiny_models["llama"], kv_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(decode_request([5, 6, 7], silent_peer), timeout=30))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive" in info.value.details()
    assert time.monotonic() - started < 10
    assert len(tiers.decode.engine.leases) == 0


def test_prefill_dying_mid_transfer_fails_the_request_and_frees_blocks(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], prefill={"max_num_batched_tokens": 16})
    prompt = prompt_ids(2, 900, 2000)  # ~57 chunks: long enough to be interrupted
    result = {}

    def run():
        try:
            list(tiers.stub().Generate(decode_request(prompt, tiers.prefill_address), timeout=60))
        except grpc.RpcError as exc:
            result["code"] = exc.code()

    thread = threading.Thread(target=run)
    thread.start()
    leases = tiers.decode.engine.leases
    deadline = time.monotonic() + 30
    while not any(lease.bytes_received for lease in leases._leases.values()):
        assert time.monotonic() < deadline, "transfer never started"
        time.sleep(0.005)
    tiers.loop.run(tiers.prefill.grpc.server.stop(0))  # the peer goes away, no grace
    thread.join(timeout=60)
    assert result.get("code") in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.INTERNAL)
    assert len(leases) == 0


def test_request_waits_for_blocks_then_runs(tiny_models, start_tiers):
    # a pool of 6 blocks holds one 60-token request with 30 new tokens at a time
    tiers = start_tiers(tiny_models["llama"], decode={"num_kv_blocks": 6})
    prompt = prompt_ids(4, 60, 2000)
    outputs = [None, None]

    def run(i):
        outputs[i] = list(tiers.stub().Generate(decode_request(prompt, tiers.prefill_address, 30),
                                                timeout=60))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    tokens = [[t for r in out for t in r.token_ids] for out in outputs]
    assert tokens[0] == tokens[1] and tokens[0]
    queued = sorted(out[-1].timings.queue_s for out in outputs)
    assert queued[1] > 0  # the second one waited for the first one's blocks


def test_request_larger_than_the_pool_is_resource_exhausted(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], decode={"num_kv_blocks": 2})
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(decode_request(prompt_ids(1, 60, 2000), tiers.prefill_address),
                                   timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV" in info.value.details()
