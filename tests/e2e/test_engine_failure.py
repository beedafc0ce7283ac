"""A tier process whose engine thread dies fails its in-flight request with UNAVAILABLE, reports
NOT_SERVING, and exits with status 1 (so a supervisor restarts it); it never hangs SERVING.

The fault is injected into a real `tandem decode` process: its scheduler raises once a request
is queued (the same failure a bug in schedule() would cause)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest

from protos.tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from tests.e2e.conftest import ROOT

HANG_GUARD_S = 120.0

FAULTY_DECODE = """
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


@pytest.fixture
def faulty_decode(tiny_models, tmp_path):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", FAULTY_DECODE, "decode", "--model", str(tiny_models["llama"]),
         "--host", "127.0.0.1", "--port", "0", "--num-kv-blocks", "128", "--ready-file",
         str(ready)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    yield proc, f"127.0.0.1:{json.loads(ready.read_text())['port']}"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_dead_engine_fails_the_request_and_exits_non_zero(faulty_decode):
    proc, address = faulty_decode
    request = decode_pb2.DecodeRequest(
        request_id="r", prompt_token_ids=[5, 6, 7], prefill_addresses=["127.0.0.1:1"],
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0))
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=HANG_GUARD_S))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "injected scheduler fault" in info.value.details()
    code = proc.wait(timeout=HANG_GUARD_S)
    output = proc.stdout.read()
    assert code == 1, output
    assert "engine thread failed" in output and "exiting with status 1" in output
