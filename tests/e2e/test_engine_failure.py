"""A tier process whose engine thread dies fails its in-flight request with UNAVAILABLE, reports
NOT_SERVING, and exits with status 1 (so a supervisor restarts it); it never hangs SERVING.

The fault is injected into a real `tandem decode` or `tandem prefill` process: its scheduler
raises once a request is queued (the same failure a bug in schedule() would cause)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest

from protos.tandem.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2,
                              prefill_pb2_grpc)
from tests.e2e.conftest import ROOT, instance_info

HANG_GUARD_S = 120.0

FAULTY_TIER = """
import sys
from engine import cli
from engine.scheduler import Scheduler

schedule = Scheduler.schedule

def faulty_schedule(self):
    if self.waiting:
        raise RuntimeError("injected scheduler fault")
    return schedule(self)

Scheduler.schedule = faulty_schedule
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(params=["decode", "prefill"])
def faulty_tier(request, tiny_models, tmp_path):
    """(tier, process, address) of a `tandem <tier>` whose scheduler raises."""
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", FAULTY_TIER, request.param, "--model", str(tiny_models["llama"]),
         "--host", "127.0.0.1", "--port", "0", "--num-kv-blocks", "128", "--ready-file",
         str(ready)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    yield request.param, proc, f"127.0.0.1:{json.loads(ready.read_text())['port']}"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def kv_sink():
    """host:port of a KvTransfer receiver that reads a push's messages and never answers, so a
    push to it ends only when its sender ends it."""
    def read_forever(messages, context):
        for _ in messages:
            pass
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "tandem.v1.KvTransfer", {"PushBlocks": grpc.stream_unary_rpc_method_handler(read_forever)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def call_tier(tier: str, channel: grpc.Channel, address: str, kv_peer: str) -> None:
    """One request to the tier at `address`: a decode Generate whose prefill instance is
    unreachable, or a Prefill whose KV receiver (`kv_peer`) never answers, so only the engine
    can end it before the hang guard."""
    sampling = common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
    if tier == "decode":
        list(decode_pb2_grpc.DecodeStub(channel).Generate(decode_pb2.DecodeRequest(
            request_id="r", prompt_token_ids=[5, 6, 7], prefill_addresses=["127.0.0.1:1"],
            sampling=sampling), timeout=HANG_GUARD_S))
        return
    destination = prefill_pb2.KvDestination(transfer_id="r", address=kv_peer,
                                            layout=instance_info(address).kv_layout)
    prefill_pb2_grpc.PrefillStub(channel).Prefill(prefill_pb2.PrefillRequest(
        request_id="r", prompt_token_ids=[5, 6, 7], sampling=sampling, destination=destination),
        timeout=HANG_GUARD_S)


def test_a_dead_engine_fails_the_request_and_exits_non_zero(faulty_tier, kv_sink):
    tier, proc, address = faulty_tier
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call_tier(tier, channel, address, kv_sink)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "injected scheduler fault" in info.value.details()
    code = proc.wait(timeout=HANG_GUARD_S)
    output = proc.stdout.read()
    assert code == 1, output
    assert "engine thread failed" in output and "exiting with status 1" in output
